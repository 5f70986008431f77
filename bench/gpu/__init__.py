"""The GPU check: one prepared script (``check.sh``) for a lent H100/H200, every part provable on
CPU at tiny dims (``--cpu-smoke``). See ``README.md`` beside this file."""
