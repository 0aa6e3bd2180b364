"""Engines run a job's tasks and hand each outcome back to the driver, which alone writes to the output folder.

An engine is a function ``run(spec, tasks, on_outcome, ...)``: ``local`` edits in this process, ``ray`` in Ray
Data actors. Both call :func:`..work.edit_task` on every task, so the same task gives the same bytes whichever
engine runs it.
"""
