# The image the KubeRay manifests in k8s/ run: Ray's GPU image with diffplat installed.
#   docker build -t <registry>/diffplat:0.1.0 .   (then set that name in k8s/*.yaml)
FROM rayproject/ray:2.60.0-py311-gpu
# Ray's image lets its `ray` user (uid 1000) use sudo without a password: not in a pod that serves a
# network API. The user stays; sudo goes.
USER root
RUN rm -f /etc/sudoers.d/* && sed -i '/^ray /d' /etc/sudoers && (gpasswd -d ray sudo || true) \
    && apt-get purge -y --auto-remove sudo && rm -rf /var/lib/apt/lists/*
USER ray
COPY --chown=ray:users . /home/ray/diffplat
WORKDIR /home/ray/diffplat
# requirements.lock pins every package to the versions the tests ran with, each file's hash checked
RUN pip install --no-cache-dir --require-hashes -r requirements.lock && pip install --no-cache-dir --no-deps -e .
