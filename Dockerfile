# msxplain BIDS App image.
#
#   docker build -t msxplain:0.1.0 .
#   docker run --rm --gpus all --read-only --tmpfs /tmp -v $PWD/bids:/data:ro -v $PWD/out:/out \
#       msxplain:0.1.0 /data /out participant
#
# Build arguments:
#   BASE              base image: a CUDA runtime matching the CUDA build of torch 2.14.1 (cu130); any
#                     Debian/Ubuntu with python3 >= 3.11 works for CPU-only use
#                     (scripts/check-container.sh builds from a local debootstrap base)
#   TEMPLATE_SOURCE   templateflow (default: fetch MNI152NLin2009cAsym at build time) or local
#                     (copy docker/templateflow/ from the build context; no network needed)
#   MSXPLAIN_MODELS   registry models baked in at build time, e.g. "flames cl-benchmark" (or
#                     doi:/zenodo:/https:// specs): pulled, checked and verified by the same code as
#                     `msxplain --model NAME` at run time (msxplain-tools models pull --install-into),
#                     into /opt/models/<name>; the image then runs them with --network none
ARG BASE=nvidia/cuda:13.0.1-runtime-ubuntu24.04
FROM ${BASE}

# must equal the repository's `version` file (a test checks it; check-container.sh passes it)
ARG VERSION=0.1.0
ARG TEMPLATE_SOURCE=templateflow
ARG MSXPLAIN_MODELS=""

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# hadolint ignore=DL3008
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        python3 python3-venv python3-dev gcc ca-certificates curl \
    && rm -rf /var/lib/apt/lists/*

# one install recipe for the README, CI and this image: scripts/install.sh
COPY pyproject.toml README.md version run.py /opt/msxplain/
COPY bids_app /opt/msxplain/bids_app
COPY scripts /opt/msxplain/scripts
WORKDIR /opt/msxplain
RUN MSXPLAIN_VENV=/opt/venv MSXPLAIN_EXTRAS="" MSXPLAIN_EDITABLE=0 ./scripts/install.sh \
    && rm -rf /root/.cache

# templates, fetched (or copied) at build time: nothing is downloaded at run time
ENV TEMPLATEFLOW_HOME=/opt/templateflow \
    TEMPLATEFLOW_AUTOUPDATE=0
COPY docker /opt/msxplain/docker
RUN if [ "$TEMPLATE_SOURCE" = "local" ]; then \
        mkdir -p "$TEMPLATEFLOW_HOME" && cp -r docker/templateflow/. "$TEMPLATEFLOW_HOME"/; \
    else \
        /opt/venv/bin/msxplain-tools fetch-templates; \
    fi \
    && /opt/venv/bin/msxplain-tools fetch-templates --check

# registry models baked in: the build argument names models; at run time MSXPLAIN_MODELS is the
# folder they are found in (the ENV below), so the pull runs without the argument in its environment
# hadolint ignore=SC2086
RUN if [ -n "$MSXPLAIN_MODELS" ]; then \
        names="$MSXPLAIN_MODELS" \
        && env -u MSXPLAIN_MODELS MSXPLAIN_HOME=/tmp/msxplain-bake \
           /opt/venv/bin/msxplain-tools models pull --install-into /opt/models $names \
        && rm -rf /tmp/msxplain-bake; \
    fi

# a non-root user; every writable location is under /tmp (run with --read-only --tmpfs /tmp)
RUN useradd --create-home --uid 1000 --shell /bin/bash msxplain \
    && mkdir -p /opt/models && chmod -R go=u /opt/models /opt/templateflow /home/msxplain \
    && cp /opt/msxplain/version /version
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/msxplain \
    XDG_CACHE_HOME=/tmp/.cache \
    MPLCONFIGDIR=/tmp/.matplotlib \
    MSXPLAIN_CACHE=/tmp/.cache/msxplain \
    MSXPLAIN_MODELS=/opt/models \
    DENO_DIR=/tmp/.deno \
    nnUNet_raw=/tmp/nnUNet_raw \
    nnUNet_preprocessed=/tmp/nnUNet_preprocessed \
    nnUNet_results=/tmp/nnUNet_results \
    OMP_NUM_THREADS=1 \
    MKL_NUM_THREADS=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    MSXPLAIN_CONTAINER_TYPE=docker \
    MSXPLAIN_CONTAINER_TAG=msxplain:${VERSION}
USER 1000
WORKDIR /tmp

LABEL org.opencontainers.image.title="msxplain" \
      org.opencontainers.image.description="BIDS App: MS lesion segmentation (nnU-Net) with uncertainty and explanations" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/msxplain/msxplain"

ENTRYPOINT ["/opt/venv/bin/python", "/opt/msxplain/run.py"]
