"""Planning: memory arithmetic, parameter counts, sharding rules and the plan command's view.

Imports no torch (`qwen35 plan` runs in well under a second on a machine without it).
"""
