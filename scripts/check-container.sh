#!/usr/bin/env bash
# Build the real Dockerfile with podman (no Docker engine here) from a local debootstrap base and
# run the demo in it with --read-only --network none (recipe verified in
# ../shared/spec/container_notes.md). Prints timings; exit 0 when the image builds, answers
# --version, runs the participant and group levels offline and writes validator-clean outputs.
#
#   sudo ./scripts/check-container.sh [WORKDIR]     # default WORKDIR: /tmp/msxplain-container
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
W=${1:-/tmp/msxplain-container}
VERSION=$(cat version)
SHARED=${MSXPLAIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
mkdir -p "$W"
t() { date +%s; }
T0=$(t)

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q -o DPkg::Lock::Timeout=300 podman runc debootstrap >/dev/null
fi
cat > "$W/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
[engine]
runtime = "runc"
CONF
export CONTAINERS_CONF=$W/containers.conf
PODMAN=(podman --root "$W/storage" --runroot "$W/run")

# 1. a local Debian base (no registry is reachable); the build-time HTTPS proxy's CA is trusted
#    inside this check's base only (never in the Dockerfile)
if ! "${PODMAN[@]}" image exists localhost/debian:bookworm; then
    # the first active mirror (deb822 `URIs:` or one-line `deb`); a missing file is not an error
    MIRROR=$(cat /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
        | sed -nE 's#^(URIs:|deb)[[:space:]]+(\[[^]]*\][[:space:]]+)?(https?://[^[:space:]]+).*#\3#p' | head -1) || true
    rm -rf "$W/rootfs"
    debootstrap --variant=minbase --include=ca-certificates bookworm "$W/rootfs" "${MIRROR:-http://deb.debian.org/debian}" >/dev/null
    cp /etc/apt/sources.list.d/*.sources "$W/rootfs/etc/apt/sources.list.d/" 2>/dev/null || true
    if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$W/rootfs/usr/local/share/ca-certificates/"
        chroot "$W/rootfs" update-ca-certificates >/dev/null
    fi
    tar -C "$W/rootfs" -c . | "${PODMAN[@]}" import - localhost/debian:bookworm >/dev/null
fi
T1=$(t)

# 2. build the real Dockerfile (templates copied from ../shared: TemplateFlow's S3 is not reachable here)
rm -rf docker/templateflow
trap 'rm -rf "$REPO/docker/templateflow"' EXIT  # never leave the 38 MB copy in the working tree
cp -r "$SHARED/templateflow" docker/templateflow
"${PODMAN[@]}" build --isolation=chroot --format docker --build-arg BASE=localhost/debian:bookworm --build-arg VERSION="$VERSION" \
    --build-arg TEMPLATE_SOURCE=local -t "localhost/msxplain:$VERSION" . 2>&1 | tail -n 20
rm -rf docker/templateflow
T2=$(t)

# 3. run it read-only, offline, as the image's non-root user
RUN=("${PODMAN[@]}" run --rm --read-only --network none --cap-drop ALL --tmpfs /tmp:rw,size=8g)
"${RUN[@]}" "localhost/msxplain:$VERSION" --version
rm -rf "$W/demo" && mkdir -p "$W/demo/out"
MSXPLAIN_SHARED_DATA="$SHARED" .venv/bin/msxplain-tools synth "$W/demo/bids" --n-subjects 2 --sites 2 --seed 7 \
    --resolution 1.5 --skull-stripped --templates "$SHARED/templateflow" \
    --lesion-masks "$SHARED/open_ms_data/cross_sectional/MNI" >/dev/null
chmod -R a+rwX "$W/demo"
"${RUN[@]}" -v "$W/demo/bids:/data:ro" -v "$W/demo/out:/out" "localhost/msxplain:$VERSION" \
    /data /out participant -w /tmp/work --no-tta --nprocs 2 --reference-masks /data/derivatives/lesions
T3=$(t)
"${RUN[@]}" -v "$W/demo/bids:/data:ro" -v "$W/demo/out:/out" "localhost/msxplain:$VERSION" /data /out group
T4=$(t)
.venv/bin/bids-validator-deno "$W/demo/out" | tail -n 4
echo "timings (s): base $((T1 - T0)), build $((T2 - T1)), participant $((T3 - T2)), group $((T4 - T3)), total $((T4 - T0))"
"${PODMAN[@]}" image inspect "localhost/msxplain:$VERSION" --format 'image size: {{.Size}} bytes'
