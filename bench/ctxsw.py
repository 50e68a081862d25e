#!/usr/bin/env python3
"""Context switches and CPU per thread group of a running bench (choreo nodes, sim, bench,
nats-server), from /proc/<pid>/task/*/status and stat, over N seconds (default 10).

Usage: python3 bench/ctxsw.py [seconds]   (while `choreo bench` runs; bench/PROFILE.md)
"""
import os, sys, time, re, collections
def snap():
    r={}
    for pid in os.listdir('/proc'):
        if not pid.isdigit(): continue
        try:
            cmd=open(f'/proc/{pid}/cmdline').read().split('\0')
        except: continue
        if not cmd or not cmd[0]: continue
        exe=os.path.basename(cmd[0])
        if exe=='nats-server': name='nats-server'
        elif exe=='choreo' and len(cmd)>1:
            if cmd[1]=='node': name=cmd[cmd.index('--context')+1]
            else: name=cmd[1]
        else: continue
        try: tids=os.listdir(f'/proc/{pid}/task')
        except: continue
        for t in tids:
            try:
                st=open(f'/proc/{pid}/task/{t}/status').read()
                comm=open(f'/proc/{pid}/task/{t}/comm').read().strip()
                stat=open(f'/proc/{pid}/task/{t}/stat').read().rsplit(')',1)[1].split()
            except: continue
            v=int(re.search(r'voluntary_ctxt_switches:\s+(\d+)',st).group(1))
            n=int(re.search(r'nonvoluntary_ctxt_switches:\s+(\d+)',st).group(1))
            cpu=int(stat[11])+int(stat[12])
            comm=re.sub(r'\d+$','N',comm)
            r[(name,comm,t)]=(v,n,cpu)
    return r
a=snap(); d=float(sys.argv[1]) if len(sys.argv)>1 else 10; time.sleep(d); b=snap()
agg=collections.defaultdict(lambda:[0,0,0,0])
for k,(v,n,c) in b.items():
    v0,n0,c0=a.get(k,(0,0,0))
    g=agg[(k[0],k[1])]; g[0]+=v-v0; g[1]+=n-n0; g[2]+=c-c0; g[3]+=1
tot=0
for k,g in sorted(agg.items(), key=lambda x:-(x[1][0]+x[1][1])):
    if g[0]+g[1]<d*50: continue
    tot+=g[0]+g[1]
    print(f"{k[0]:12s} {k[1]:20s} thr={g[3]:3d} vol/s={g[0]/d:8.0f} invol/s={g[1]/d:7.0f} cpu%={g[2]/d:6.1f}")
print("total cs/s", tot/d)
