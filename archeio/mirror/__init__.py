"""`archeio mirror`: copy content-addressed blobs from an OCI registry into
S3-compatible buckets, at `containers/images/<digest>` where `archeio serve`
looks for them.

Layout: `registry` (the polite OCI client and manifest parsing), `s3` (the
buckets, through boto3), `copier` (one blob, streamed and verified, to every
bucket), `job` (the walk over repositories, tags and images; done markers),
`ratelimit` (rate, concurrency, backoff), `progress` (bar, log lines,
summary), `cli` (the subcommand's arguments). It uses the server only
through its settings format (`archeio.config.parse_mirrors`).
"""
