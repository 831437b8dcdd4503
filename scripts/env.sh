# Sourced by scripts/demo.sh and scripts/test.sh: a .venv with the package installed.
# On a fresh Debian, `python3 -m venv` needs the python3-venv package; as root we add it.
ensure_venv() {
  local extras="$1"
  if [ ! -x .venv/bin/pip ]; then
    rm -rf .venv
    if ! python3 -m venv .venv 2>/dev/null; then
      if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt_install python3-venv
        rm -rf .venv && python3 -m venv .venv
      else
        echo "error: python3 -m venv failed: install python3-venv (apt-get install -y python3-venv)" >&2
        exit 1
      fi
    fi
  fi
  .venv/bin/pip install -q --disable-pip-version-check -e ".${extras}"
}

APT_UPDATED=""
apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "error: missing $*: install it with: sudo apt-get install -y $*" >&2
    exit 1
  fi
  if [ -z "$APT_UPDATED" ]; then apt-get update -qq; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}
