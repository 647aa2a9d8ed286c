# The image the KubeRay manifests in k8s/ run: Ray's GPU image with diffplat installed.
#   docker build -t <registry>/diffplat:0.1.0 .   (then set that name in k8s/*.yaml)
FROM rayproject/ray:2.60.0-py311-gpu
COPY --chown=ray:users . /home/ray/diffplat
WORKDIR /home/ray/diffplat
# constraints.txt pins torch and the rest to the versions the tests ran with
RUN pip install --no-cache-dir -c constraints.txt -e . && rm -rf .git
