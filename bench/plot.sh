#!/bin/sh
# SPDX-License-Identifier: MIT
#
# bench/plot.sh: draw the sweeps of a tally-bench JSON result as PNG charts
# (gnuplot, Debian package gnuplot-nox; nothing else: the JSON is read with
# awk, one row per line as tally-bench writes it).
#
#   sh bench/plot.sh [bench-results.json [OUTDIR]]     (default OUTDIR: charts)
#
# Charts, each from the rows of one part, one line per "series", x = the
# row's "param", error bars = min .. max over the repetitions:
#   threads.png    record ns/op against threads (tally rings, mutex and
#                  atomic histograms); paced records with the engine
#                  draining, and their drops, against the rate
#   subjects.png   publish ms, and ingest Msamples per CPU-second beside its
#                  two floors, against active subjects
#   drain.png      the engine's drain against drain_threads (wall and per
#                  CPU-second) at 10, 1,000 and 10,000 subjects
#   window.png     publish, slice close and stats ms, and heap per subject,
#                  against the window length in 1 s slices
#   consumers.png  pending refresh ms by LIST and by INFO against consumers,
#                  and the ratio INFO / LIST
# A chart whose part is not in the JSON is skipped.
set -eu

json=${1:-bench-results.json}
out=${2:-charts}

command -v gnuplot >/dev/null 2>&1 || {
	echo "plot.sh: gnuplot not found (Debian: apt-get install gnuplot-nox)" >&2
	exit 1
}
[ -r "$json" ] || { echo "plot.sh: cannot read $json" >&2; exit 1; }
mkdir -p "$out"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/tally-plot.XXXXXX")
trap 'rm -rf "$tmp"' EXIT INT TERM

# rows PART: "series<TAB>param<TAB>median<TAB>min<TAB>max" for each row of PART.
rows() {
	awk -v part="$1" '
	function field(key,   re, v) {
		re = "\"" key "\":(\"[^\"]*\"|[^,}]*)"
		if (!match($0, re)) return ""
		v = substr($0, RSTART + length(key) + 3, RLENGTH - length(key) - 3)
		gsub(/^"|"$/, "", v)
		return v
	}
	/"part":/ && field("part") == part {
		printf "%s\t%s\t%s\t%s\t%s\n", field("series"), field("param"), field("median"), field("min"), field("max")
	}' "$json"
}

# series PART SERIES FILE: that series' rows as "param median min max", by param.
series() {
	rows "$1" | awk -F '\t' -v s="$2" '$1 == s { print $2, $3, $4, $5 }' | sort -g >"$3"
	[ -s "$3" ]
}

# The machine line under every title.
machine=$(awk '
	match($0, /"model":"[^"]*"/) { m = substr($0, RSTART + 9, RLENGTH - 10) }
	match($0, /"cpus":[0-9]+/) { c = substr($0, RSTART + 7, RLENGTH - 7) }
	match($0, /"load_before":[0-9.-]+/) { l = substr($0, RSTART + 14, RLENGTH - 14) }
	END { printf "%s, %s CPUs, load %s", m, c, l }' "$json")

common="set terminal pngcairo size 960,500 font 'DejaVu Sans,9'
set grid
set key below left Left reverse box
set bmargin 9
set offsets graph 0.04, graph 0.04, 0, 0
set datafile missing 'nan'"

# ratio A B: "param A/B" of the medians, for the params both have.
ratio() {
	awk 'NR == FNR { a[$1] = $2; next } ($1 in a) && $2 > 0 { print $1, a[$1] / $2 }' "$1" "$2"
}

plot_threads() {
	d=$tmp/threads
	series record "mutex histogram" "$d.mutex" || return 0
	series record "atomic histogram" "$d.atomic" || return 0
	series record "tally ring, no drain" "$d.nodrain" || return 0
	series record "tally ring, flat out vs drain thread (mostly drops)" "$d.flat" || : >"$d.flat"
	series record "tally ring, paced, engine draining, 1 thr" "$d.paced1" || : >"$d.paced1"
	series record "tally ring, paced, engine draining, 2 thr" "$d.paced2" || : >"$d.paced2"
	series record "dropped, paced, 1 thr" "$d.pdrop1" || : >"$d.pdrop1"
	series record "dropped, paced, 2 thr" "$d.pdrop2" || : >"$d.pdrop2"
	gnuplot <<EOF
$common
set output '$out/threads.png'
set multiplot layout 1,2 title "record: against threads, and paced with the engine draining (median, min..max)\n{/*0.8 $machine}"
set xlabel 'threads recording at once'
set xtics 1
set autoscale xfix
set offsets 0.3, 0.3, 0, 0
set title 'ns per record (log)'
set logscale y
plot '$d.mutex' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'mutex-protected shared histogram', \
     '$d.atomic' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'atomic-increment shared histogram', \
     '$d.nodrain' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'tally ring per thread, no consumer', \
     '$d.flat' u 1:2:3:4 w yerrorlines lw 1 dt 3 pt 6 t 'tally ring, flat out against a drain thread (mostly drops)', \
     3 w l dt 2 lc rgb 'red' t 'target at 1 thread: 3 ns'
unset logscale y
set title 'tally ring, paced, real engine draining: ns per record'
set logscale x
set xlabel 'records per second per thread (M, log)'
set xtics auto
set autoscale x
set offsets graph 0.04, graph 0.04, 0, 0
set yrange [0:*]
set y2range [0:100]
set y2tics 20
set y2label 'records dropped, ring full (%)'
plot '$d.paced1' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '1 thread', \
     '$d.paced2' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '2 threads', \
     '$d.pdrop1' u 1:2 axes x1y2 w lp lw 1 dt 3 pt 6 t 'dropped, 1 thread (right axis)', \
     '$d.pdrop2' u 1:2 axes x1y2 w lp lw 1 dt 3 pt 6 t 'dropped, 2 threads (right axis)'
unset multiplot
EOF
	echo "plot.sh: $out/threads.png"
}

plot_subjects() {
	d=$tmp/subjects
	series publish "publish (real engine, 10 s window)" "$d.publish" || return 0
	series ingest "ingest loop as in engine.c, 1 core (per CPU second)" "$d.ingest" ||
		series ingest "ingest loop as in engine.c, 1 core" "$d.ingest" || return 0
	series ingest "floor: 2 lines a sample, ideal prefetch (per CPU second)" "$d.floor2" || : >"$d.floor2"
	series ingest "floor: streaming pass over the rings (per CPU second)" "$d.floor1" || : >"$d.floor1"
	gnuplot <<EOF
$common
set output '$out/subjects.png'
set multiplot layout 1,2 title "how cost grows with active subjects (median, min..max)\n{/*0.8 $machine}"
set logscale x
set xlabel 'active subjects (log)'
set title 'one publish (ms, log)'
set logscale y
set arrow 1 from 1000, graph 0 to 1000, graph 1 nohead dt 3 lc rgb 'gray60'
plot '$d.publish' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'publish, real engine', \
     2 w l dt 2 lc rgb 'red' t 'target at 1,000 subjects: 2 ms'
set title 'aggregator ingest on one core (Msamples per CPU-second, log)'
plot '$d.ingest' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'ingest loop as in engine.c', \
     '$d.floor2' u 1:2:3:4 w yerrorlines lw 2 pt 6 dt 2 t 'floor: the 2 lines a sample needs, ideal prefetch', \
     '$d.floor1' u 1:2:3:4 w yerrorlines lw 1 pt 6 dt 3 t 'floor: streaming pass over the rings', \
     100 w l dt 2 lc rgb 'red' t 'target at 10,000 subjects: 100 M/s'
unset multiplot
EOF
	echo "plot.sh: $out/subjects.png"
}

# drain.png: the real engine's drain with N drain threads, wall and per
# CPU-second, at 10, 1,000 and 10,000 subjects (part drain).
plot_drain() {
	d=$tmp/drain
	series drain "drain threads, 10 subj" "$d.w10" || return 0
	series drain "drain threads, 1000 subj" "$d.w1k" || : >"$d.w1k"
	series drain "drain threads, 10000 subj" "$d.w10k" || : >"$d.w10k"
	series drain "drain threads per CPU-s, 10 subj" "$d.c10" || : >"$d.c10"
	series drain "drain threads per CPU-s, 1000 subj" "$d.c1k" || : >"$d.c1k"
	series drain "drain threads per CPU-s, 10000 subj" "$d.c10k" || : >"$d.c10k"
	gnuplot <<EOF
$common
set output '$out/drain.png'
set multiplot layout 1,2 title "N drain threads: the real engine draining filled rings (median, min..max)\n{/*0.8 $machine}"
set xlabel 'drain threads'
set xtics 1
set offsets 0.3, 0.3, 0, 0
set yrange [0:*]
set title 'Msamples/s (wall)'
plot '$d.w10' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '10 subjects', \
     '$d.w1k' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '1,000 subjects', \
     '$d.w10k' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '10,000 subjects'
set title 'Msamples per CPU-second of the process'
plot '$d.c10' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '10 subjects', \
     '$d.c1k' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '1,000 subjects', \
     '$d.c10k' u 1:2:3:4 w yerrorlines lw 2 pt 7 t '10,000 subjects'
unset multiplot
EOF
	echo "plot.sh: $out/drain.png"
}

plot_window() {
	d=$tmp/window
	series window "publish, 1,000 subjects (real engine)" "$d.publish" || return 0
	series window "close a slice, 1,000 subjects" "$d.close" || return 0
	series window "stats of 1,000 subjects (publish's share)" "$d.stats" || return 0
	have_heap=1
	series window "heap per subject" "$d.heap" || have_heap=0
	gnuplot <<EOF
$common
set output '$out/window.png'
set multiplot layout 1,2 title "how cost grows with the window length (1 s slices; median, min..max)\n{/*0.8 $machine}"
set logscale x
set xlabel 'window length in slices of 1 s (log)'
set title '1,000 subjects: time per call (ms)'
set yrange [0:*]
plot '$d.publish' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'publish, real engine (window not yet full)', \
     '$d.close' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'close a slice (every 1 s), full windows', \
     '$d.stats' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'stats of every subject, full windows'
set title 'heap per subject (KB), 1,000 values per subject per second'
if ($have_heap) plot '$d.heap' u 1:2 w lp lw 2 pt 7 t 'heap per subject'
unset multiplot
EOF
	echo "plot.sh: $out/window.png"
}

plot_consumers() {
	d=$tmp/consumers
	series pending "one INFO per consumer (poller)" "$d.info" || return 0
	series pending "CONSUMER.LIST paging (poller)" "$d.list" || return 0
	series pending "cnats js_Consumers, full decoding" "$d.cnats" || : >"$d.cnats"
	ratio "$d.info" "$d.list" >"$d.ratio"
	gnuplot <<EOF
$common
set output '$out/consumers.png'
set multiplot layout 1,2 title "pending refresh against consumers, real nats-server on loopback (median, min..max)\n{/*0.8 $machine}"
set logscale xy
set xlabel 'consumers (log)'
set title 'one refresh of every consumer (ms, log)'
plot '$d.info' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'one CONSUMER.INFO per consumer', \
     '$d.list' u 1:2:3:4 w yerrorlines lw 2 pt 7 t 'CONSUMER.LIST, 256 per page (poller)', \
     '$d.cnats' u 1:2:3:4 w yerrorlines lw 1 dt 3 pt 6 t 'cnats js_Consumers (decodes every field)' noenhanced
unset logscale y
set title 'INFO / LIST (ratio of medians, same run)'
set yrange [0:*]
set offsets graph 0.04, graph 0.04, graph 0.12, 0
plot '$d.ratio' u 1:2 w lp lw 2 pt 7 t 'INFO time / LIST time', \
     '' u 1:2:(sprintf('%.1fx', \$2)) w labels offset 0,1 notitle, \
     10 w l dt 2 lc rgb 'red' t 'target at 1,000 consumers: >= 10'
unset multiplot
EOF
	echo "plot.sh: $out/consumers.png"
}

plot_threads
plot_subjects
plot_drain
plot_window
plot_consumers
