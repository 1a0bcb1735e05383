#!/usr/bin/env bash
# The test suites (make test / test-main / test-old), after setup_host.sh built the hosts:
#   scripts/run_tests.sh main | old | both
# main: every test on ComfyUI 0.3.75 (browser tests included: its frontend 1.32.9 is the one js/ targets);
# old:  the node, server and file tests on 0.3.52, to show the pack still imports and works there.
# both: all of that on two lanes, one per core, one torch thread each (OMP_NUM_THREADS=1, inherited by every server
#       and subprocess they start): lane 1 runs the old host's suite, then the main host's LANE_ONE_MAIN files; lane 2 runs
#       every other main-host file (so a new test file lands there by default). Why one thread: torch's default is one
#       thread per core, and two suites with two spinning threads each on two cores ran the same test up to 5x slower
#       (tests/test_synthetic_model.py's reduced evaluation: 106 s alone, 522 s beside the other suite). Why lanes:
#       the old host's suite takes under half as long as the main one, so beside it alone one core idled for the
#       rest. Each lane's output is printed whole; the run fails if any part fails.
# pytest exits 5 when it collected nothing: that is a failure here, never a pass.
set -uo pipefail
cd "$(dirname "$0")/.."
root="$PWD"
main_host="${MAIN_HOST:-0.3.75}"
old_host="${OLD_HOST:-0.3.52}"
OLD_TESTS="tests/test_nodes.py tests/test_fused_attention.py tests/test_faces.py tests/test_face_benchmark.py
  tests/test_server_e2e.py tests/test_synthetic_model.py tests/test_bad_input.py tests/test_train_server.py
  tests/test_identity_files.py tests/test_sdxl_e2e.py tests/test_token_budget.py tests/test_block_weights.py
  tests/test_flux_nodes.py tests/test_flux_train.py tests/test_metrics.py tests/test_hostile_inputs.py
  tests/test_hostile_server.py tests/test_parsers_property.py"
# main-host files that run on lane 1 after the old host's suite (chosen by their measured time to balance the lanes)
LANE_ONE_MAIN="tests/test_train_cli.py tests/test_batch.py tests/test_flux_e2e.py tests/test_cleanup.py tests/test_chaining.py tests/test_sdxl_e2e.py"

suite() {   # suite <host version> <pytest args...>
  local v="$1"; shift
  COMFYUI_PATH="$root/.hosts/$v/ComfyUI" "$root/.hosts/$v/venv/bin/python" -m pytest -q -p no:cacheprovider "$@"
  local rc=$?
  [ $rc -eq 5 ] && echo "pytest collected no tests (ComfyUI $v)" >&2
  return $rc
}

case "${1:-both}" in
  main) suite "$main_host" --durations=8 tests ;;
  old)  suite "$old_host" $OLD_TESTS ;;
  both)
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" MKL_NUM_THREADS="${MKL_NUM_THREADS:-1}"
    lane_log="$(mktemp)"
    trap 'rm -f "$lane_log"' EXIT
    ignore=(); for f in $LANE_ONE_MAIN; do ignore+=("--ignore=$f"); done
    ( suite "$old_host" $OLD_TESTS; old_rc=$?
      echo "== ComfyUI $main_host: $LANE_ONE_MAIN =="
      suite "$main_host" $LANE_ONE_MAIN; lane_main_rc=$?
      echo "== lane 1 exit: ComfyUI $old_host $old_rc, ComfyUI $main_host $lane_main_rc =="
      [ $old_rc -eq 0 ] && [ $lane_main_rc -eq 0 ] ) > "$lane_log" 2>&1 &
    lane_pid=$!
    echo "== ComfyUI $main_host: every test file but lane 1's (lane 1: ComfyUI $old_host's suite, then $LANE_ONE_MAIN on $main_host; its output follows) =="
    suite "$main_host" --durations=8 "${ignore[@]}" tests; main_rc=$?
    wait "$lane_pid"; lane_rc=$?
    echo "== lane 1: ComfyUI $old_host's node, server and file tests, then ComfyUI $main_host's lane-1 files =="
    cat "$lane_log"
    echo "== exit: lane 2 (ComfyUI $main_host) $main_rc, lane 1 $lane_rc =="
    [ $main_rc -eq 0 ] && [ $lane_rc -eq 0 ] ;;
  *) echo "run_tests.sh: main, old or both" >&2; exit 2 ;;
esac
