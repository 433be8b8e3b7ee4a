"""Offline batch mode (BatchLLM): a global prefix plan, group scheduling, memory-centric admission."""
