"""The device side: executors (launch/collect), batch building, paged attention, KV pools,
sampling and the CPU decode kernel. Imports nothing of the engine but its request types."""
