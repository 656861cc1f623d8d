#!/usr/bin/env bash
# The programs the test suite runs that pip cannot install: installed from Debian's packages
# where apt-get is there and we are root; elsewhere a hint. Never fails the build: the test
# that needs a missing one fails and says how to install it.
[ "$(uname -s)" = Linux ] || exit 0
missing=()
command -v systemd-analyze >/dev/null || missing+=(systemd)  # tests/test_ops.py: systemd-analyze verify
[ ${#missing[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}") \
    >/dev/null 2>&1 && echo "moebus: installed ${missing[*]} for the tests" && exit 0
fi
echo "moebus: the tests need ${missing[*]} (Debian/Ubuntu: apt-get install ${missing[*]})" >&2
exit 0
