"""The closed loop, run for real: a generator served by a real server answers tasks under a
guard through atomicguard's own agent, its attempts fill the store lorad watches, lorad trains
on them, and the server loads the version lorad promotes before the next tasks come.

lorad itself never needs this package: `lorad demo` and bench/closed_loop.py use it to play
the generator's side. Its parts:

- :mod:`lorad.loop.tasks`: a task (specification, tests) and its guard, run in a subprocess
  with a time limit; ``python -m lorad.loop.tasks --guard TASKS.json`` is the same guard as
  a lorad ``guard_command``;
- :mod:`lorad.loop.server`: vLLM's CPU build started on the base checkpoint, its
  OpenAI-protocol chat endpoint and its runtime LoRA loading;
- :mod:`lorad.loop.agent`: one round of traffic through atomicguard's DualStateAgent and its
  OpenAI-protocol generator, writing a FilesystemArtifactDAG;
- :mod:`lorad.loop.score`: greedy first attempts on unseen tasks through the server, with
  Wilson intervals and the paired test the gate uses.
"""
