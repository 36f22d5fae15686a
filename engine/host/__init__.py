"""The engine thread's side: one step at a time (core), the interface schedulers decide through,
the request queues, a sequence's KV blocks and the block manager, sequences, detokenization."""
