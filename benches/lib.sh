# Shared helpers of the benchmark scripts (benches/fanout.sh, benches/fleet.sh):
# how a process' CPU and memory are read, and kube-prefetch's /metrics.
# Sourced, not run.
# shellcheck shell=bash

clk_tck=$(getconf CLK_TCK)

# CPU ticks (user + system) of a process, from /proc/PID/stat fields 14 and
# 15 (counted after the ")" that ends the command name); 0 once it is gone.
cpu_ticks() { # pid
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
  stat=${stat##*) }
  awk '{print $12 + $13}' <<<"$stat"
}

# Peak resident set (VmHWM) of a live process, in KiB.
peak_rss_kb() { # pid
  awk '/^VmHWM:/ {print $2}' "/proc/$1/status"
}

seconds() { awk -v t="$1" -v hz="$clk_tck" 'BEGIN {printf "%.2f", t / hz}'; }
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
now_ms() { date +%s%3N; }

# A counter of kube-prefetch's /metrics at URL, summed over its label sets.
metric() { # url name
  curl -fsS --max-time 5 "$1/metrics" |
    awk -v name="$2" '$1 == name || index($1, name "{") == 1 {sum += $NF} END {printf "%d", sum}'
}

# A free loopback port in FROM..FROM+100.
free_port() { # from
  local candidate
  for candidate in $(seq "$1" $(($1 + 100))); do
    if ! ss -Hltn "sport = :$candidate" | grep -q .; then echo "$candidate"; return 0; fi
  done
  return 1
}
