# Burns a fixed share of one core: busy for B ms of every 100 ms (B from argv), until killed.
import sys, time
b = float(sys.argv[1]) / 1000.0
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < b:
        pass
    time.sleep(max(0.0, 0.1 - (time.perf_counter() - t)))
