# Shared by the ensure_*.sh scripts (sourced, not run): install a Debian package when a
# tool is missing, as root or through passwordless sudo, never by any other download.

# apt_ready WHAT PACKAGE: check that apt-get exists and set SUDO ("" as root, "sudo -n"
# otherwise); on failure say why on stderr, naming WHAT is missing and the command to run.
apt_ready() {
  local what=$1 package=$2
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "no $what and no apt-get on this machine" >&2; exit 2
  fi
  SUDO=""
  if [ "$(id -u)" != "0" ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then SUDO="sudo -n"; else
      echo "no $what, and installing it needs root (run: apt-get install -y $package)" >&2; exit 2
    fi
  fi
  export DEBIAN_FRONTEND=noninteractive
}

# apt_install ARGS...: refresh the package lists (a fresh machine may have none), then install.
apt_install() {
  $SUDO apt-get update -qq >&2 || echo "apt-get update failed; trying the install anyway" >&2
  $SUDO apt-get install -y -qq --no-install-recommends "$@" >&2
}
