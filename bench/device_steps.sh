# Steps of bench/device_run.sh under a time budget (sourced; bash). Each step runs under `timeout`
# with its own cap, never past the deadline, and logs its command, exit status and seconds.
#
# Needs: WORK (logs go to $WORK/<step>.log), OUT ($OUT/summary.txt mirrors the steps), STEPS (the
# steps file), START (the $SECONDS the budget counts from), BUDGET_S (seconds; empty: no deadline).
# Settable: PACK_RESERVE (seconds kept for the end), GRACE (seconds from SIGINT to SIGKILL),
# RESERVE (seconds the steps still to come keep for themselves), MIN_STEP (a step with fewer seconds
# left is skipped).
PACK_RESERVE="${PACK_RESERVE:-25}"
MIN_STEP="${MIN_STEP:-10}"
GRACE="${GRACE:-10}"
RESERVE="${RESERVE:-0}"

note() {   # note TEXT: to the console, the steps file and $OUT/summary.txt
    echo "$*" | tee -a "$STEPS"
    cp "$STEPS" "$OUT/summary.txt"
}

left() {   # the seconds a step may still take (huge without a budget)
    if [ -z "$BUDGET_S" ]; then echo 999999; return; fi
    echo $((BUDGET_S - (SECONDS - START) - PACK_RESERVE - GRACE - RESERVE))
}

cap_for() {   # cap_for CAP: a step's timeout (0 = none without a budget), or nothing when no time is left
    local cap="$1" remaining
    if [ -z "$BUDGET_S" ]; then echo 0; return; fi
    remaining=$(left)
    [ "$remaining" -lt "$MIN_STEP" ] && return
    [ "$cap" -le 0 ] || [ "$cap" -gt "$remaining" ] && cap=$remaining
    echo "$cap"
}

_status() {   # _status RC: the exit status in words
    case "$1" in
        124) echo "exit 124 (timed out)" ;;
        137) echo "exit 137 (killed after timing out)" ;;
        *) echo "exit $1" ;;
    esac
}

step() {   # step NAME CAP COMMAND...: run under its cap, log to $WORK/NAME.log, record status and time
    local name="$1" cap="$2"; shift 2
    local limit begin rc
    limit=$(cap_for "$cap")
    if [ -z "$limit" ]; then
        note "== $name: skipped, no time left in the ${BUDGET_S} s budget"
        return 0
    fi
    begin=$SECONDS
    note "== $name (at $((SECONDS - START)) s, cap $limit s): $*"
    timeout -s INT -k "$GRACE" "$limit" "$@" > "$WORK/$name.log" 2>&1
    rc=$?
    note "   $name: $(_status "$rc") after $((SECONDS - begin)) s"
    tail -n 4 "$WORK/$name.log" | sed 's/^/   | /'
    return 0
}

BG_PID=""; BG_NAME=""; BG_BEGIN=0
step_background() {   # like step, but in the background (one at a time); finish_background waits for it
    local name="$1" cap="$2"; shift 2
    local limit
    limit=$(cap_for "$cap")
    if [ -z "$limit" ]; then
        note "== $name: skipped, no time left in the ${BUDGET_S} s budget"
        return 0
    fi
    BG_NAME=$name; BG_BEGIN=$SECONDS
    note "== $name (background, at $((SECONDS - START)) s, cap $limit s): $*"
    timeout -s INT -k "$GRACE" "$limit" "$@" > "$WORK/$name.log" 2>&1 &
    BG_PID=$!
}

finish_background() {
    [ -z "$BG_PID" ] && return 0
    wait "$BG_PID"
    local rc=$?
    note "   $BG_NAME: $(_status "$rc") after $((SECONDS - BG_BEGIN)) s"
    tail -n 4 "$WORK/$BG_NAME.log" | sed 's/^/   | /'
    BG_PID=""
}
