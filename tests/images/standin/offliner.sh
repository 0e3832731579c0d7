#!/bin/sh
# Stand-in for an openZIM scraper ("offliner") in the zimfarm-worker tests.
#
# Installed in the test images as mwoffliner, youtube2zim, gutenberg2zim and
# phet2zim; what it is called picks its output flag and default ZIM name.
# It never touches a network. Flags are `--key=value` or `--key`; unknown
# ones are ignored, as a real scraper's own flags would be. The reference is
# tests/images/README.md; in short, in the order they act:
#
#   --stderr=TEXT      print TEXT on stderr (each occurrence, in order)
#   --argvDump         write every argument (not the program name), each
#                      followed by a NUL byte, to OUTPUT/argv.bin
#   --redis=TARGET     (mwoffliner only) a unix socket path, which must be a
#                      socket, or a redis:// URL; redis-cli PINGs it and
#                      anything but PONG within 5 s exits 3
#   --spam=MB          print about MB megabytes (decimal allowed) of log lines
#   --sleep=SECONDS    print a progress line every 0.5 s for SECONDS
#   --stats-filename=PATH  (with --sleep) openZIM's progress file: write
#                      {"done": I, "total": N} to PATH before the first
#                      0.5 s step (I = 0) and after each (I = the step), N
#                      the number of steps; rewritten in place as a real
#                      scraper does, so a reader may find it half-written;
#                      a failed write exits 1. Without --sleep, not written
#   --count=N[:RATE]   print "line 1" .. "line N", RATE lines a second
#                      (default 20; 0: as fast as it can)
#   --countStderr      (with --count) even-numbered lines go to stderr
#   --burst=LINES:FILE (with --count) once OUTPUT/FILE exists, the next
#                      LINES numbered lines are printed at once, then the
#                      count goes on at its rate (FILE is removed, so that
#                      it is not taken for output)
#   --silent=SECONDS   sleep SECONDS without printing anything
#   --eatMemory=MB     hold about MB megabytes of memory (a memory-limit or
#                      OOM-killer test), then go on
#   --fill=MB          write MB megabytes of zeros to OUTPUT/fill.bin (a
#                      full-disk test: a failed write exits 1, as a real
#                      scraper's would)
#   --exit=CODE        if CODE is not 0: last line on stderr, exit CODE, no ZIM
#   --zims=N           write N ZIMs NAME_1.zim .. NAME_N.zim (default: one,
#                      NAME.zim; 0: none)
#   --name=NAME        ZIM name (default: wikipedia_en_test, youtube_test,
#                      gutenberg_test, phet_test)
#   --zimMB=N          each ZIM is a ZIM-shaped file of N MiB (header, random
#                      filler, the MD5 of it all) instead of the demo ZIM
#   --zimEvery=SECONDS pause SECONDS after each ZIM but the last
#   --growFor=SECONDS  (with --zimMB) the last ZIM grows under its own name
#                      for SECONDS, a step each second, its MD5 written last
#   --rewriteFirst=HOW (with --zimMB) the first ZIM is written with a
#                      checksum that fails (HOW=bad) or intact (good), and
#                      written again, intact, with new filler, before "done"
#   --ignoreTerm       ignore SIGTERM/SIGINT (default: exit 143/130 at once)
#   --sh=COMMANDS      run COMMANDS with sh -c before the ZIMs are written (a
#                      hostile scraper: links, fifos, network probes), with
#                      OUT set to the output directory; its status is ignored
#   --shAfter=COMMANDS the same, after the ZIMs are written, before "done"
#
# OUTPUT is --outputDirectory=DIR for mwoffliner, --output=DIR for the
# others, and for gutenberg2zim its last positional argument too; it is
# created if missing and defaults to /output (/phet/dist for phet2zim).
#
# The first line printed is "<program> stand-in starting", the last one on
# success is "done". Bad flag values exit 2, a failed write 1.
# shellcheck shell=sh
set -u

prog=${0##*/}
ZIM=/opt/zims/demo.zim

fail() { # CODE MESSAGE
    printf '%s stand-in: %s\n' "$prog" "$2" >&2
    exit "$1"
}

out_flag=output
out=/output
redis_ok=0
case $prog in
mwoffliner)
    out_flag=outputDirectory
    name=wikipedia_en_test
    redis_ok=1
    ;;
youtube2zim) name=youtube_test ;;
gutenberg2zim) name=gutenberg_test ;; # its output dir is its last positional argument
phet2zim)
    name=phet_test
    out=/phet/dist
    ;;
*) fail 2 "unknown stand-in name (expected mwoffliner, youtube2zim, gutenberg2zim or phet2zim)" ;;
esac
echo "$prog stand-in starting"

is_uint() { case $1 in '' | *[!0-9]*) return 1 ;; esac }
is_number() { case $1 in '' | . | *[!0-9.]* | *.*.*) return 1 ;; esac }

# ---------------------------------------------------------------- signals

sleep_pid=''
on_signal() { # SIGNAL CODE
    [ -n "$sleep_pid" ] && kill "$sleep_pid" 2>/dev/null
    printf '%s stand-in: got SIG%s, exiting\n' "$prog" "$1" >&2
    exit "$2"
}
trap 'on_signal TERM 143' TERM
trap 'on_signal INT 130' INT

# Sleeps in a child and waits for it, so that a signal is handled at once
# even while sleeping (a shell runs its traps only between commands).
pause() {
    sleep "$1" &
    sleep_pid=$!
    wait "$sleep_pid"
    sleep_pid=''
}

# ------------------------------------------------------------------- flags

stats_file='' count_n='' count_rate=20 count_stderr=0 burst_lines='' burst_file='' sh_before='' sh_after='' zim_mb='' zim_every='' grow_for='' rewrite_first='' argv_dump=0 zims='' sleep_s='' silent_s='' spam_mb='' eat_mb='' fill_mb='' exit_code=0 redis='' positional=''
for arg do
    case $arg in
    --*=*)
        key=${arg%%=*}
        key=${key#--}
        val=${arg#*=}
        ;;
    --*)
        key=${arg#--}
        val=''
        ;;
    *)
        positional=$arg
        continue
        ;;
    esac
    case $key in
    "$out_flag") out=$val ;;
    name) name=$val ;;
    zims) zims=$val ;;
    zimMB) zim_mb=$val ;;
    zimEvery) zim_every=$val ;;
    growFor) grow_for=$val ;;
    rewriteFirst) rewrite_first=$val ;;
    argvDump) argv_dump=1 ;;
    sleep) sleep_s=$val ;;
    stats-filename) stats_file=$val ;;
    silent) silent_s=$val ;;
    count)
        count_n=${val%%:*}
        case $val in *:*) count_rate=${val#*:} ;; esac
        ;;
    countStderr) count_stderr=1 ;;
    burst)
        burst_lines=${val%%:*}
        case $val in *:?*) burst_file=${val#*:} ;; *) burst_file='' ;; esac
        ;;
    spam) spam_mb=$val ;;
    eatMemory) eat_mb=$val ;;
    fill) fill_mb=$val ;;
    exit) exit_code=$val ;;
    stderr) printf '%s\n' "$val" >&2 ;;
    ignoreTerm) trap '' TERM INT ;;
    redis) [ "$redis_ok" -eq 1 ] && redis=$val ;;
    sh) sh_before=$val ;;
    shAfter) sh_after=$val ;;
    esac
done
if [ "$prog" = gutenberg2zim ] && [ -n "$positional" ]; then
    out=$positional
fi

[ -n "$out" ] || fail 2 "empty output directory"
[ -n "$name" ] || fail 2 "empty --name"
[ -z "$zims" ] || is_uint "$zims" || fail 2 "--zims wants a whole number, not '$zims'"
[ -z "$zim_mb" ] || { is_uint "$zim_mb" && [ "$zim_mb" -ge 1 ]; } \
    || fail 2 "--zimMB wants whole megabytes (1 or more), not '$zim_mb'"
[ -z "$zim_every" ] || is_number "$zim_every" || fail 2 "--zimEvery wants seconds, not '$zim_every'"
[ -z "$grow_for" ] || is_uint "$grow_for" || fail 2 "--growFor wants whole seconds, not '$grow_for'"
case $rewrite_first in '' | bad | good) ;; *) fail 2 "--rewriteFirst wants bad or good, not '$rewrite_first'" ;; esac
[ -z "$sleep_s" ] || is_number "$sleep_s" || fail 2 "--sleep wants seconds, not '$sleep_s'"
[ -z "$silent_s" ] || is_number "$silent_s" || fail 2 "--silent wants seconds, not '$silent_s'"
[ -z "$count_n" ] || is_uint "$count_n" || fail 2 "--count wants a whole number of lines, not '$count_n'"
is_uint "$count_rate" || fail 2 "--count wants whole lines a second after the colon, not '$count_rate'"
[ -z "$burst_lines" ] || { is_uint "$burst_lines" && [ -n "$burst_file" ]; } \
    || fail 2 "--burst wants LINES:FILE (a whole number, a file name), not '$burst_lines:$burst_file'"
[ -z "$spam_mb" ] || is_number "$spam_mb" || fail 2 "--spam wants megabytes, not '$spam_mb'"
[ -z "$eat_mb" ] || is_uint "$eat_mb" || fail 2 "--eatMemory wants whole megabytes, not '$eat_mb'"
[ -z "$fill_mb" ] || is_uint "$fill_mb" || fail 2 "--fill wants whole megabytes, not '$fill_mb'"
{ is_uint "$exit_code" && [ "$exit_code" -le 255 ]; } \
    || fail 2 "--exit wants a code from 0 to 255, not '$exit_code'"

mkdir -p -- "$out" || fail 1 "cannot create the output directory $out"

# ------------------------------------------------------------------ actions

if [ "$argv_dump" -eq 1 ]; then
    printf '%s\0' "$@" >"$out/argv.bin" || fail 1 "cannot write $out/argv.bin"
    echo "wrote $out/argv.bin ($# arguments)"
fi

if [ -n "$redis" ]; then
    case $redis in
    redis://* | rediss://*) set -- -u "$redis" ;;
    *)
        [ -S "$redis" ] || fail 3 "redis: $redis is not a unix socket"
        set -- -s "$redis"
        ;;
    esac
    command -v redis-cli >/dev/null 2>&1 || fail 3 "redis: no redis-cli in this image"
    reply=$(timeout 5 redis-cli "$@" ping 2>&1)
    [ -n "$reply" ] || reply="no answer within 5 s"
    [ "$reply" = PONG ] || fail 3 "redis at $redis does not answer PING ($reply)"
    echo "redis at $redis answers PING"
fi

if [ -n "$spam_mb" ]; then
    bytes=$(awk -v mb="$spam_mb" 'BEGIN { printf "%d", mb * 1048576 }')
    yes "$prog stand-in log spam: lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod" \
        | head -c "$bytes"
    echo
    echo "spammed $bytes bytes"
fi

# The progress file, truncated and written in two steps, in place: a
# reader may find it empty or half-written, as a real scraper's.
write_stats() { # DONE TOTAL
    [ -n "$stats_file" ] || return 0
    { printf '{"done": %d, ' "$1" && printf '"total": %d}\n' "$2"; } >"$stats_file" \
        || fail 1 "cannot write $stats_file"
}

if [ -n "$sleep_s" ]; then
    steps=$(awk -v s="$sleep_s" 'BEGIN { n = s * 2; printf "%d", (n == int(n)) ? n : int(n) + 1 }')
    write_stats 0 "$steps"
    i=1
    while [ "$i" -le "$steps" ]; do
        echo "progress $i/$steps"
        pause 0.5
        write_stats "$i" "$steps"
        i=$((i + 1))
    done
fi

# Numbered lines: a test checks that each reaches the task log once, in
# order, across restarts of the worker that follows them.
count_line() { # NUMBER
    if [ "$count_stderr" -eq 1 ] && [ $(($1 % 2)) -eq 0 ]; then
        echo "line $1" >&2
    else
        echo "line $1"
    fi
}
if [ -n "$count_n" ]; then
    gap=0
    [ "$count_rate" -eq 0 ] || gap=$(awk -v r="$count_rate" 'BEGIN { printf "%.4f", 1 / r }')
    i=1
    while [ "$i" -le "$count_n" ]; do
        if [ -n "$burst_lines" ] && [ -e "$out/$burst_file" ]; then
            rm -f "$out/$burst_file"
            last=$((i + burst_lines - 1))
            [ "$last" -le "$count_n" ] || last=$count_n
            if [ "$count_stderr" -eq 1 ]; then
                awk -v a="$i" -v b="$last" 'BEGIN { for (k = a; k <= b; k++) if (k % 2) print "line " k; else print "line " k > "/dev/stderr" }'
            else
                awk -v a="$i" -v b="$last" 'BEGIN { for (k = a; k <= b; k++) print "line " k }'
            fi
            i=$((last + 1))
            burst_lines=''
            continue
        fi
        count_line "$i"
        [ "$count_rate" -eq 0 ] || pause "$gap"
        i=$((i + 1))
    done
    echo "counted to $count_n"
fi

[ -z "$silent_s" ] || pause "$silent_s"

if [ -n "$eat_mb" ]; then
    echo "eating $eat_mb MiB of memory"
    # The shell keeps a command substitution's output in its own memory.
    hog=$(head -c "$((eat_mb * 1048576))" /dev/zero | tr '\0' x)
    echo "holding ${#hog} bytes of memory"
fi

if [ -n "$fill_mb" ]; then
    echo "writing $fill_mb MiB to $out/fill.bin"
    dd if=/dev/zero of="$out/fill.bin" bs=1048576 count="$fill_mb" 2>/dev/null \
        || fail 1 "cannot write $out/fill.bin: No space left on device?"
    echo "wrote $out/fill.bin"
fi

if [ "$exit_code" -ne 0 ]; then
    fail "$exit_code" "exiting with code $exit_code as asked (--exit)"
fi

# A hostile scraper's own commands (tests of the box around it).
run_sh() { # COMMANDS
    [ -n "$1" ] || return 0
    OUT=$out sh -c "$1" || echo "$prog stand-in: --sh commands exited with $?" >&2
}
run_sh "$sh_before"

# The 8 bytes of $1, little-endian.
le64() {
    v=$1 k=0
    while [ "$k" -lt 8 ]; do
        # shellcheck disable=SC2059 # the format is one octal escape
        printf "\\$(printf %03o $((v & 255)))"
        v=$((v >> 8)) k=$((k + 1))
    done
}

# A ZIM-shaped file of MIB MiB at PATH, written in place: the header's magic,
# version and checksumPos, random filler in STEPS steps a second apart, then
# the MD5 of all that (16 zero bytes when GOOD is 0: its checksum fails).
zim_shaped() { # PATH MIB STEPS GOOD
    pos=$(($2 * 1048576 - 16))
    { printf 'ZIM\004\006\000' && head -c 66 /dev/zero && le64 "$pos"; } >"$1" || return 1
    left=$((pos - 80)) step=$(((pos - 80) / $3)) k=1
    while [ "$k" -lt "$3" ]; do
        head -c "$step" /dev/urandom >>"$1" || return 1
        left=$((left - step)) k=$((k + 1))
        pause 1
    done
    head -c "$left" /dev/urandom >>"$1" || return 1
    if [ "$4" = 1 ]; then
        sum=$(md5sum <"$1" | cut -c1-32)
        # shellcheck disable=SC2059 # the format is the digest's bytes
        printf "$(echo "$sum" | sed 's/../\\x&/g')" >>"$1"
    else
        head -c 16 /dev/zero >>"$1"
    fi
}

write_zim() { # NAME INDEX LAST
    if [ -z "$zim_mb" ]; then
        cp -- "$ZIM" "$out/$1.zim" || fail 1 "cannot write $out/$1.zim"
    else
        steps=1 good=1
        [ "$2" = "$3" ] && [ -n "$grow_for" ] && [ "$grow_for" -gt 1 ] && steps=$grow_for
        [ "$2" = 1 ] && [ "$rewrite_first" = bad ] && good=0
        zim_shaped "$out/$1.zim" "$zim_mb" "$steps" "$good" || fail 1 "cannot write $out/$1.zim"
    fi
    echo "wrote $out/$1.zim"
    [ "$2" = "$3" ] || [ -z "$zim_every" ] || pause "$zim_every"
}
if [ -z "$zims" ]; then
    write_zim "$name" 1 1
    first=$name
else
    i=1 first=${name}_1
    while [ "$i" -le "$zims" ]; do
        write_zim "${name}_$i" "$i" "$zims"
        i=$((i + 1))
    done
fi
if [ -n "$rewrite_first" ] && [ -n "$zim_mb" ] && [ "$zims" != 0 ]; then
    zim_shaped "$out/$first.zim" "$zim_mb" 1 1 || fail 1 "cannot write $out/$first.zim"
    echo "rewrote $out/$first.zim, intact"
fi
run_sh "$sh_after"
echo "done"
