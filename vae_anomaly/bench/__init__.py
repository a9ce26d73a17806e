"""The harnesses that measure the product: detection benchmarks and suites (``suites``), batch
scoring throughput (``batch``), the HTTP load test (``loadtest``) and the service as a child
process (``process``), which the load test, the integration tests and the dashboard preview use.
"""
