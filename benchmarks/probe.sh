#!/bin/bash
# The probe of probe.c for machines without a C compiler (bash's start-up adds about 1 ms).
started=$EPOCHREALTIME
log=$1
run=${MQ_WORKER_RUN_ID:-unknown}
if [[ -n ${2:-} ]]; then
    trap 'echo "T $run $EPOCHREALTIME" >>"$log"; exit 143' TERM
fi
echo "S $run $started" >>"$log"
if [[ -n ${2:-} ]]; then
    sleep "$2" &
    wait $!
fi
