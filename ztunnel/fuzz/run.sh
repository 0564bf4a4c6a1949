#!/usr/bin/env bash
# Runs every cargo-fuzz target for a bounded time, for CI:
#
#   bash ztunnel/fuzz/run.sh                      # 20 s per target
#   FUZZ_RELEASE=1 FUZZ_SECONDS=300 bash ztunnel/fuzz/run.sh   # longer, optimized build
#   FUZZ_TARGETS="policy certificate" bash ztunnel/fuzz/run.sh
#
# Installs cargo-fuzz if missing, builds all targets once (nightly, ASan, debug assertions, unoptimized
# unless FUZZ_RELEASE=1),
# then runs each target for FUZZ_SECONDS seconds starting from its seed corpus (corpus/<target>;
# new inputs go to target/fuzz-work/corpus/<target>, never into the checked-in seeds).
# Prints one line per target, "fuzz <target>: <N> execs, <C> crashes", and exits non-zero if any
# target crashed, leaked, timed out or ran out of memory; the reproducer is then in
# target/fuzz-work/artifacts/<target>/ and the libFuzzer log is printed.
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"

seconds="${FUZZ_SECONDS:-20}"
read -r -a targets <<<"${FUZZ_TARGETS:-zds_request local_config hbone_headers certificate policy xds_resource l7_config}"
toolchain="${FUZZ_TOOLCHAIN:-nightly}"
# Reproduce a crash with the same flags (`cargo fuzz run --dev --debug-assertions <target> <file>`).
# CI's runs are short (10 s a target) and only a smoke test of every parser, so the targets
# are built unoptimized (`--dev`): about 7 min on 2 cores instead of about 15, for about 30
# times fewer inputs a second (docs/decisions.md). FUZZ_RELEASE=1 builds optimized, for real
# fuzzing runs.
flags=(--debug-assertions)
profile=debug
if [ "${FUZZ_RELEASE:-0}" = 1 ]; then
    flags+=(-O)
    profile=release
else
    flags+=(--dev)
fi

if ! command -v cargo >/dev/null 2>&1 && [ -f "${CARGO_HOME:-$HOME/.cargo}/env" ]; then
    # shellcheck disable=SC1091
    . "${CARGO_HOME:-$HOME/.cargo}/env"
fi

# The ztunnel crate's build script compiles the kernel programs (nightly + rust-src +
# bpf-linker); the project's own set-up installs those when they are missing.
if ! rustup run "$toolchain" rustc --version >/dev/null 2>&1 || ! command -v bpf-linker >/dev/null 2>&1; then
    echo "fuzz: nightly toolchain or bpf-linker missing; running cargo xtask setup"
    (cd "$here/../.." && cargo xtask setup)
fi
if ! cargo "+$toolchain" fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

echo "fuzz: building ${targets[*]}"
build_start=$SECONDS
if ! cargo "+$toolchain" fuzz build "${flags[@]}"; then
    echo "fuzz: the build failed (not a crash found by fuzzing); disk left: $(df -h . | awk 'NR==2 {print $4}')"
    exit 2
fi
echo "fuzz: build took $((SECONDS - build_start)) s"

triple="$(rustc "+$toolchain" -vV | sed -n 's/^host: //p')"
bin_dir="$here/target/$triple/$profile"
work="$here/target/fuzz-work"
failed=0
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t"
    log="$work/$t.log"
    rm -rf "$artifacts"
    mkdir -p "$corpus" "$artifacts"
    extra=()
    case "$t" in
        local_config | policy) extra+=("-dict=$here/dicts/local_config.dict") ;;
    esac
    set +e
    # The binary cargo-fuzz built, run directly (`cargo fuzz run` would re-check the build).
    ASAN_OPTIONS="${ASAN_OPTIONS:-detect_odr_violation=0}" "$bin_dir/$t" "$corpus" "$here/corpus/$t" \
        -max_total_time="$seconds" -timeout=30 -rss_limit_mb=4096 -print_final_stats=1 \
        -artifact_prefix="$artifacts/" "${extra[@]}" >"$log" 2>&1
    status=$?
    set -e
    execs="$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -n 1)"
    if [ -z "$execs" ]; then
        execs="$(sed -n 's/^#\([0-9]*\)[[:space:]]*DONE.*/\1/p' "$log" | tail -n 1)"
    fi
    crashes="$(find "$artifacts" -type f | wc -l)"
    if [ "$status" -ne 0 ] && [ "$crashes" -eq 0 ]; then
        crashes=1 # libFuzzer failed without writing an artifact (e.g. a startup error)
    fi
    if [ "$crashes" -ne 0 ]; then
        failed=1
        echo "----- $t: libFuzzer exited $status; last lines of $log:"
        tail -n 60 "$log"
        echo "----- reproducer(s) in $artifacts:"
        find "$artifacts" -type f
        echo "----- reproduce with: (cd $here && cargo +$toolchain fuzz run ${flags[*]} $t <file>)"
    fi
    echo "fuzz $t: ${execs:-0} execs, $crashes crashes"
done
exit "$failed"
