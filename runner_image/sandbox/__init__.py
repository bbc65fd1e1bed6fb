"""The sandbox runner: PID 1 of every sandbox container, its template and its task children (stdlib only).

See runner_image/PROTOCOL.md. Entry point: runner_image/runner.py (/opt/warmpool/runner.py in the image),
which imports `pid1` and everything it needs before the template is forked: every module here is loaded
before the first frame is read, and none holds a task's data at import time, so what the template and its
children inherit from PID 1 is the pristine state.

Who runs what (the reuse rule):
- PID 1: pid1 (start-up, the frame loop), frames, requests, tasks, sessions, pipes, zygote, reset,
  network, sysv, template (the handle).
- The template: template_process (spawn, kill, clean), scratch (the cleaner).
- A task's child: child, limits, execute, session_child, go_pipe (the reading side), taskfiles.
"""
