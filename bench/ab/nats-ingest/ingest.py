#!/usr/bin/env python3
"""How fast an otherwise idle nats-server stores pipelined publishes (with a message id and
eight other headers, about 230 bytes of payload) into one file-backed stream from one
client (nats-py: pip install nats-py). Start a server first:
  .tools/venv/bin/nats-server -js -sd /tmp/nb -p 4333
Usage: python3 bench/ab/nats-ingest/ingest.py [messages] [batch]
2026-12-03 on the Intel VM: 20,000 in batches of 256: 11,871/s (0.083 ms a message);
10,000 in batches of 32: 9,368/s. nats-py itself is the limit at these rates.
"""
import asyncio, time, uuid, sys, nats
from nats.js.api import StreamConfig
N=int(sys.argv[1]) if len(sys.argv)>1 else 20000; B=int(sys.argv[2]) if len(sys.argv)>2 else 256
async def main():
    nc=await nats.connect("nats://127.0.0.1:4333"); js=nc.jetstream()
    try: await js.delete_stream("T")
    except Exception: pass
    await js.add_stream(StreamConfig(name="T", subjects=["t.>"], duplicate_window=10.0))
    payload=b'{"order_id":"o-123456","customer_id":"c-1","lines":[{"sku":"sku-1","qty":2,"price_cents":1999}],"total_cents":3998}'*2
    hdr={f"Choreo-H{i}":"x"*30 for i in range(8)}
    t0=time.perf_counter(); bt=[]
    for s in range(0,N,B):
        b0=time.perf_counter()
        await asyncio.gather(*[js.publish(f"t.evt.X", payload, headers={**hdr,"Nats-Msg-Id":uuid.uuid4().hex}) for _ in range(B)])
        bt.append(time.perf_counter()-b0)
    dt=time.perf_counter()-t0
    bt.sort()
    print(f"{N} msgs in {dt:.2f}s = {N/dt:.0f}/s; batch of {B}: p50 {1000*bt[len(bt)//2]:.1f} ms = {1000*bt[len(bt)//2]/B:.3f} ms/msg")
    await nc.close()
asyncio.run(main())
