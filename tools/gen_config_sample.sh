#!/bin/sh
# Regenerate etc/qsnap/qsnap.conf.sample from the options' code (oslo-config-generator).
# Usage: tools/gen_config_sample.sh [OUTPUT]  (default: etc/qsnap/qsnap.conf.sample)
# The unit test tests/unit/hostagent/test_config.py runs this into a temp file and compares,
# so the committed sample stays current. Needs the package installed (entry point "qsnap").
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-"$root/etc/qsnap/qsnap.conf.sample"}
gen=${OSLO_CONFIG_GENERATOR:-"$root/.venv/bin/oslo-config-generator"}
[ -x "$gen" ] || gen=oslo-config-generator
exec "$gen" --namespace qsnap --namespace oslo.log --namespace oslo.messaging \
    --wrap-width 79 --output-file "$out"
