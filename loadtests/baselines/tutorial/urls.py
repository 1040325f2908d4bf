from django.http import JsonResponse
from django.urls import path


def readyz(request):
    """Only for the stack launcher's readiness poll."""
    return JsonResponse({"status": "ready"})


urlpatterns = [path("readyz", readyz)]
