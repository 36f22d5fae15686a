"""Scheduler plugins: the public plugin API, its registry and the built-in policies.

For now the engine's own `engine.policy.FcfsPolicy` is the only policy; the plugin API
(entry points in the `tandem.schedulers` group) is built on `engine.policy.SchedulingPolicy`.
"""
