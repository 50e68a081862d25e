#!/bin/bash
# Pins each node process (all its threads) while a bench runs: orders on CPU 0, the other
# contexts on CPU 1; nats-server, sim and the bench itself stay free.
while true; do
  for ctx in orders inventory payments shipping customers; do
    for pid in $(pgrep -f "choreo node --context $ctx "); do
      [ -e /tmp/s19/ab/pinned.$pid ] && continue
      if [ $ctx = orders ]; then cpu=0; else cpu=1; fi
      taskset -a -cp $cpu $pid >/dev/null 2>&1 && touch /tmp/s19/ab/pinned.$pid
    done
  done
  sleep 0.3
done
