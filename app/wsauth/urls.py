from django.urls import path

from wsauth.views import WsTokenView

urlpatterns = [path("ws-token/", WsTokenView.as_view(), name="ws-token")]
