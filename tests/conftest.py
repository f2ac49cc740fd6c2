# Scripts under multidevice/ run in their own process (with 8 host devices); never import them here.
collect_ignore = ["multidevice"]
