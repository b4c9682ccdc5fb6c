#!/usr/bin/env bash
# Installs what s2train and its tests need on a fresh Debian machine: the speech synthesisers the demo
# corpus uses (flite, espeak-ng, festival), then torch, then this package with its development tools. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null; then SUDO="sudo"; fi

# festival with its American English diphone voice speaks the demo's fine-tuning voice (one the models never hear);
# chromium is the browser the server's page is tested in (Playwright drives it; no browser download)
if ! command -v flite >/dev/null || ! command -v espeak-ng >/dev/null || ! command -v ffmpeg >/dev/null \
  || ! command -v text2wave >/dev/null || [ ! -d /usr/share/festival/voices/english/ked_diphone ] \
  || ! command -v chromium >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
    flite espeak-ng ffmpeg festival festvox-kdlpc16k chromium git >/dev/null
fi

PIP="python -m pip"
# torch 2.14.1 with torchaudio 2.11.0 is a pair speechbrain imports with.
if ! python -c "import torch, torchaudio, sys; sys.exit(torch.__version__.split('+')[0] != '2.14.1')" 2>/dev/null; then
  $PIP install -q "torch==2.14.1" "torchaudio==2.11.0"
fi
$PIP install -q -e ".[dev]"
