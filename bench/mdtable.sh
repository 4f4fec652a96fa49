#!/bin/sh
# SPDX-License-Identifier: MIT
#
# bench/mdtable.sh: the result table of a tally-bench JSON file as a
# Markdown table (for BENCHMARKS.md): part, case, median, unit, min .. max,
# and the ratio of medians to each baseline row of the same run, worded as
# tally-bench prints it. Reads the JSON with awk, one row per line.
#
#   sh bench/mdtable.sh [bench-results.json] > table.md
set -eu

json=${1:-bench-results.json}
[ -r "$json" ] || { echo "mdtable.sh: cannot read $json" >&2; exit 1; }

awk '
function field(key,   re, v) {
	re = "\"" key "\":(\"[^\"]*\"|[^,}]*)"
	if (!match($0, re)) return ""
	v = substr($0, RSTART + length(key) + 3, RLENGTH - length(key) - 3)
	gsub(/^"|"$/, "", v)
	return v
}
function num(v) { return v + 0 < 1000 ? sprintf("%.3f", v) : sprintf("%.0f", v) }
/"part":/ {
	n++
	part[n] = field("part"); name[n] = field("case"); unit[n] = field("unit")
	med[n] = field("median"); lo[n] = field("min"); hi[n] = field("max")
	base[n] = field("baseline"); rate[n] = unit[n] ~ /\/s$/
	idx[part[n] "|" name[n]] = n
}
END {
	print "| part | case | median | unit | min .. max | vs baseline (ratio of medians, same run) |"
	print "| --- | --- | ---: | --- | --- | --- |"
	for (i = 1; i <= n; i++) {
		vs = ""
		k = split(base[i], b, "|")
		for (j = 1; j <= k; j++) {
			m = idx[part[i] "|" b[j]]
			if (!m || med[m] == 0 || med[i] == 0) continue
			q = rate[i] ? med[i] / med[m] : med[m] / med[i]
			if (rate[i]) t = sprintf("%.2fx of %s", q, b[j])
			else if (q >= 1) t = sprintf("%.2fx faster than %s", q, b[j])
			else t = sprintf("%.2fx slower than %s", 1 / q, b[j])
			vs = vs (vs == "" ? "" : "; ") t
		}
		printf "| %s | %s | %s | %s | %s .. %s | %s |\n", part[i], name[i], num(med[i]), unit[i],
		       num(lo[i]), num(hi[i]), vs
	}
}' "$json"
