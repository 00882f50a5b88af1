"""Ways a job's rows reach the provider besides the online pipeline of
:mod:`batchgpt.runner`: :mod:`.batch` drives the provider's Batch API (``mode: batch``).
Both write the same output and failures files through the same store, with the same
exactly-once rule; :mod:`.lines` builds those files' lines for both."""
