from django.urls import path

from notifications import views

urlpatterns = [
    path("", views.notifications, name="notifications"),
    path("ping/", views.ping, name="notifications-ping"),
]
