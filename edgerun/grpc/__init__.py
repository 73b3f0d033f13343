"""KServe v2 gRPC protocol: the service definition, its generated modules and the tensor codec."""
