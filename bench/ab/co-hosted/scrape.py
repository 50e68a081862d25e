#!/usr/bin/env python3
"""Rates and means of the orders context's counters and histograms on a running node's
/metrics, read twice 10 s apart (bench/PROFILE.md, "Contexts hosted together").

Usage: python3 bench/ab/co-hosted/scrape.py CONTEXTS   (the node's --context value)
Histogram means are printed x1000 (ms for the *_seconds ones, otherwise units x1000).
"""
import subprocess, re, sys, time, urllib.request, collections
ctx_arg = sys.argv[1]  # the node's --context value (e.g. orders, or all)
out = subprocess.run(['ss','-ltnpH'],capture_output=True,text=True).stdout
pids = subprocess.run(['pgrep','-f',f'choreo node --context {ctx_arg} '],capture_output=True,text=True).stdout.split()
port=None
for l in out.splitlines():
    for p in pids:
        if f'pid={p},' in l:
            m=re.search(r':(\d+)\s',l.split()[3]+' ')
            if m and port is None: port=m.group(1)
def get():
    t=urllib.request.urlopen(f'http://127.0.0.1:{port}/metrics').read().decode()
    r={}
    for l in t.splitlines():
        if l.startswith('#') or 'context="orders"' not in l: continue
        if not (('_sum' in l) or ('_count' in l) or '_total' in l): continue
        k,v=l.rsplit(' ',1); r[k]=float(v)
    return r
a=get(); time.sleep(10); b=get()
agg=collections.defaultdict(dict)
for k in b:
    d=b[k]-a.get(k,0)
    if d==0: continue
    base=k.replace('_sum','').replace('_count','')
    agg[base]['sum' if '_sum' in k else ('count' if '_count' in k else 'total')]=d
for k,v in sorted(agg.items()):
    if 'count' in v: print(f"{k[:110]:110s} {v['count']/10:8.0f}/s mean {1000*v.get('sum',0)/max(v['count'],1):8.3f} (ms or units)")
    else: print(f"{k[:110]:110s} {v['total']/10:8.0f}/s")
