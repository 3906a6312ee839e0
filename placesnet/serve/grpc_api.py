"""The gRPC API (serving/scene.proto): :class:`GrpcServicer`'s ``Predict``, a method of the Serve
deployment that Serve's gRPC proxy calls by the RPC's name. The same checks, predict and answers
as a POST /predict of the same images; a ClientError becomes the gRPC status GRPC_CODES gives for
its HTTP status, with the same message."""

from __future__ import annotations

from placesnet.serve.errors import ClientError
from placesnet.serve.replica import Replica, Upload


class GrpcServicer:
    """placesnet.SceneClassifier's methods, answered from ``self.replica``."""

    replica: Replica

    async def Predict(self, request, grpc_context):  # noqa: N802 (the RPC's name in scene.proto)
        """PredictRequest (images' bytes, top_k; 0: the default) -> PredictReply: one result per
        image, in order, each its predictions or its own error. A refused request (no or a wrong
        token in the ``authorization`` metadata, a bad top_k, no images, over a limit) sets the
        gRPC status and details and returns an empty reply."""
        from serving.scene_pb2 import ImageResult, Prediction, PredictReply

        replica = self.replica
        try:
            replica.authorize(dict(grpc_context.invocation_metadata()).get("authorization", ""))
            model = replica.current()  # the whole request is answered by this one
            k = replica.check_top_k(request.top_k or None, model)
            images = list(request.images)
            replica.options.check_request_size(len(images), sum(map(len, images)))
            if not images:
                raise ClientError(
                    400, "no images in the request: fill PredictRequest.images", reason="no_images"
                )
        except ClientError as e:
            replica.metrics.refused(e.status, e.reason)
            grpc_context.set_code(e.grpc_code)
            grpc_context.set_details(e.message)
            return PredictReply()
        uploads = [Upload(f"image{i}", data) for i, data in enumerate(images, 1)]
        answer = await replica.predict(uploads, k, model)
        results = [
            ImageResult(error=r.error)
            if r.error is not None
            else ImageResult(predictions=[Prediction(**p) for p in r.predictions])
            for r in answer.results
        ]
        return PredictReply(
            results=results, model=model.model_id, checkpoint=str(model.checkpoint), note=model.note
        )
