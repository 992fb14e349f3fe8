"""The Files and Batches APIs: jobs stored in the key store's database, run at background
priority through the gateway's own request path (``runner``)."""
