#!/usr/bin/env bash
# The test suites (make test / test-main / test-old), after setup_host.sh built the hosts:
#   scripts/run_tests.sh main | old | both
# main: every test on ComfyUI 0.3.75 (browser tests included: its frontend 1.32.9 is the one js/ targets);
# old:  the node, server and file tests on 0.3.52, to show the pack still imports and works there.
# both: the two side by side, one torch thread each (OMP_NUM_THREADS=1, inherited by every server and subprocess they
#       start). Each suite keeps about one core busy (servers, subprocesses, waits), so on two cores the whole run
#       takes about as long as the longer suite instead of the sum. Why one thread: torch's default is one thread per
#       core, and two suites with two spinning threads each on two cores were measured up to 5x slower on the same
#       test (tests/test_synthetic_model.py's reduced evaluation: 106 s alone, 522 s beside the other suite). The old
#       host's output is printed whole after the main one's, and the run fails if either fails.
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
    old_log="$(mktemp)"
    trap 'rm -f "$old_log"' EXIT
    suite "$old_host" $OLD_TESTS > "$old_log" 2>&1 &
    old_pid=$!
    echo "== ComfyUI $main_host: all tests (ComfyUI $old_host's suite runs beside it; its output follows) =="
    suite "$main_host" --durations=8 tests; main_rc=$?
    wait "$old_pid"; old_rc=$?
    echo "== ComfyUI $old_host: node, server and file tests =="
    cat "$old_log"
    echo "== exit: ComfyUI $main_host $main_rc, ComfyUI $old_host $old_rc =="
    [ $main_rc -eq 0 ] && [ $old_rc -eq 0 ] ;;
  *) echo "run_tests.sh: main, old or both" >&2; exit 2 ;;
esac
