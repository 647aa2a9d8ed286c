"""A diffplat adapter as an MLflow model: logged as code (MLflow's models from code, no pickle), it
needs diffusers, not diffplat, to load and run.

    model = mlflow.pyfunc.load_model("models:/bdd-lora@production")
    model.predict([{"prompt": "a bus at night"}], params={"num_inference_steps": 30, "seed": 3})  # base64 PNGs

`load_context` loads the base model the adapter was trained on (`model_config.base_model`: a hub
id, or a folder the loading machine sees) with the adapter in stock diffusers: a LoRA
(`kind: lora`) on the text-to-image pipeline, an In-Context LoRA (`ic_lora`) on the inpainting
pipeline, a ControlNet (`controlnet`) beside the base; a full fine-tune (`full`) is the whole
model and loads alone. `predict` takes rows (a DataFrame, or a
list of dicts) with a `prompt`; `ic_lora` rows also carry `image` and `mask` (base64), and
`controlnet` rows the `image` to follow.
"""

from __future__ import annotations

import base64
import io

import mlflow


class DiffusersAdapter(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        import torch
        from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image, ControlNetModel

        config = context.model_config
        self.kind = config.get("kind", "lora")
        folder = context.artifacts["adapter"]
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.float16 if device == "cuda" else torch.float32
        base = config["base_model"]
        if self.kind == "full":  # a whole fine-tuned model: the artifact is the pipeline itself
            self.pipe = AutoPipelineForText2Image.from_pretrained(folder, torch_dtype=dtype)
        elif self.kind == "controlnet":
            net = ControlNetModel.from_pretrained(folder, torch_dtype=dtype)
            self.pipe = AutoPipelineForText2Image.from_pretrained(base, controlnet=net, torch_dtype=dtype)
        else:
            auto = AutoPipelineForInpainting if self.kind == "ic_lora" else AutoPipelineForText2Image
            self.pipe = auto.from_pretrained(base, torch_dtype=dtype)
            self.pipe.load_lora_weights(folder, weight_name=config.get("weight_name"))
        self.pipe.to(device)
        self.pipe.set_progress_bar_config(disable=True)

    def predict(self, context, model_input, params=None):
        import torch
        from PIL import Image

        params = dict(params or {})
        rows = model_input.to_dict("records") if hasattr(model_input, "to_dict") else [
            {"prompt": p} if isinstance(p, str) else dict(p) for p in model_input]  # fmt: skip
        seed = int(params.pop("seed", 0))
        out = []
        for i, row in enumerate(rows):
            kwargs = {k: float(v) if k == "guidance_scale" else int(v) for k, v in params.items()
                      if k in ("num_inference_steps", "guidance_scale", "width", "height") and v}  # 0: the pipeline's default
            row = {k: v for k, v in row.items() if isinstance(v, str)}  # absent optional columns come as NaN
            if self.kind in ("ic_lora", "controlnet"):
                kwargs["image"] = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
            if self.kind == "ic_lora":
                kwargs["mask_image"] = Image.open(io.BytesIO(base64.b64decode(row["mask"]))).convert("L")
            image = self.pipe(row["prompt"], generator=torch.Generator().manual_seed(seed + i), **kwargs).images[0]
            buf = io.BytesIO()
            image.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return out


mlflow.models.set_model(DiffusersAdapter())
