"""The launcher: the ``specforge`` command, whole runs on one machine (``specforge run``, embedded
or colocated), progress and status views, and the embedded servers. It sits above the three
services and is the only package that imports them together."""
