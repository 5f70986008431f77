"""The capture service: PromptTasks -> frozen target -> features in the FeatureStore + SampleRefs.

``worker.CaptureWorker`` is the loop (any number share the run's prompt queue). Its stages:
``prepare`` turns a task into the tokens to capture (no bus), ``decode`` lets the target write
the replies in decode mode, ``emit`` stores, publishes and acks, ``failures`` settles what fails,
``end_of_data`` ends the splits, and ``backpressure`` pauses the loop while the trainers fall
behind. ``command`` is ``specforge capture --run R``.
"""
