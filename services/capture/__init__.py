"""The capture service: PromptTasks -> frozen target -> features in the FeatureStore + SampleRefs.

``worker.CaptureWorker`` is the loop (any number share the run's prompt queue),
``backpressure`` pauses it while the trainers fall behind, and ``command`` is
``specforge capture --run R``.
"""
