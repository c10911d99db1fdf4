pluginManagement {
    repositories {
        google()
        mavenCentral()
        gradlePluginPortal()
    }
}
dependencyResolutionManagement {
    repositoriesMode.set(RepositoriesMode.FAIL_ON_PROJECT_REPOS)
    repositories {
        google()
        mavenCentral()
        mavenLocal()        // an onnxruntime-extensions-android built from source (README: tokenizer graphs)
    }
}
rootProject.name = "edgevlm-android"
include(":edgevlm-android", ":app")
