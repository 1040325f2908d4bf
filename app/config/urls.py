from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path
from django.views.generic import RedirectView

from wsauth.views import ApiKeysView

urlpatterns = [
    path("", RedirectView.as_view(url="/chat/lobby/", permanent=False)),
    path("chat/", include("chat.urls")),
    path("notifications/", include("notifications.urls")),
    path("api/", include("wsauth.urls")),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("accounts/api-keys/", ApiKeysView.as_view(), name="api-keys"),
    path("admin/", admin.site.urls),
]
