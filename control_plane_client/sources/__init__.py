"""Where xDS resources come from: REST polling, gRPC (ADS or per type), watched files."""
