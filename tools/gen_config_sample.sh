#!/bin/sh
# Regenerate the config samples from the options' code (oslo-config-generator).
# Usage: tools/gen_config_sample.sh                 both samples under etc/qsnap/
#        tools/gen_config_sample.sh OUTPUT          the agent's sample only, into OUTPUT
#        tools/gen_config_sample.sh --api OUTPUT    the API's sample only, into OUTPUT
# Each service's own options come from its entry point (qsnap, qsnap.api); the libraries'
# namespaces (oslo.log: --debug/--log-file and friends; oslo.messaging incl. the
# [oslo_messaging_notifications] group the agent's operation notifications read) are added
# here. tests/unit/hostagent/test_config.py compares a fresh agent sample with the committed
# one, so the samples stay current. Needs the package installed (the entry points).
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
gen=${OSLO_CONFIG_GENERATOR:-"$root/.venv/bin/oslo-config-generator"}
[ -x "$gen" ] || gen=oslo-config-generator

agent() {
    "$gen" --namespace qsnap --namespace oslo.log --namespace oslo.messaging \
        --wrap-width 79 --output-file "$1"
}
api() {
    "$gen" --namespace qsnap.api --namespace oslo.log --namespace oslo.messaging \
        --namespace oslo.policy --namespace keystonemiddleware.auth_token \
        --wrap-width 79 --output-file "$1"
}

case "${1:-}" in
    "") agent "$root/etc/qsnap/qsnap.conf.sample"; api "$root/etc/qsnap/qsnap-api.conf.sample" ;;
    --api) api "${2:?usage: $0 --api OUTPUT}" ;;
    *) agent "$1" ;;
esac
