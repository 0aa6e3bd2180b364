"""Editing a whole dataset: ``ip2p-edit batch INPUT --out DIR``, resumable and exactly-once, on one machine or Ray.

The pieces, one concept each, and none knows which engine runs the rows:

- :mod:`.rows`: what to edit — a folder of pictures crossed with instructions, or a JSONL manifest of rows;
- :mod:`.keys`: what makes a result the same result — content hashes of pictures, masks and model files, and a
  key per row over everything that changes its pixels;
- :mod:`.store`: the output folder — atomic pictures, ``triplets.jsonl`` (the trainer's manifest format), a lock;
- :mod:`.work`: one row edited, picture in, PNG bytes out, the same code in every engine's workers;
- :mod:`.filtering`: ``--filter-clip``, the paper's CLIP filter: scores kept with each row, thresholds applied
  by the driver, so new thresholds re-filter without editing;
- :mod:`.job`: the job from rows to summary (checks, skipping what is done, progress, summary);
- :mod:`.engines`: who runs the edits — ``local`` (this process) or ``ray`` (Ray Data actors, one model each).
"""
