"""The demo, the synthetic data it uses and the crash-test writer; never imported by the core."""
