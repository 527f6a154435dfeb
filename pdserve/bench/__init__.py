"""``pdserve bench``: a serving benchmark client shaped like ``vllm bench serve``.

Modules: ``workload`` (prompts and their lengths), ``arrivals`` (when each request is sent),
``client`` (the OpenAI streaming client that times each request), ``stats`` (percentiles,
throughput, goodput), ``report`` (JSON and PNG plots) and ``cli`` (the sub-command).
"""
