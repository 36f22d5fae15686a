"""The service layer: the `tandem` CLI now, the gRPC servicer and server later."""
